//! `herald-sandbox`: the fake WeChat API as a process, configured by the `[sandbox]` section of
//! `herald.toml` and `HERALD_SANDBOX__*` variables.

use anyhow::Context as _;
use herald_sandbox::{Sandbox, SandboxConfig};
use herald_telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct SandboxFile {
    sandbox: SandboxConfig,
    telemetry: TelemetrySettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let file = herald_config::load::<SandboxFile>(None).context("loading configuration")?;
    let _telemetry = herald_telemetry::init("herald-sandbox", &file.telemetry);
    let config = file.sandbox;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let apps: Vec<&str> = config.apps.iter().map(|app| app.appid.as_str()).collect();
    tracing::info!(?apps, "starting WeChat sandbox");
    Sandbox::new(config)
        .serve(
            listener,
            herald_config::shutdown_on_signal().cancelled_owned(),
        )
        .await
        .context("serving")?;
    tracing::info!("WeChat sandbox stopped");
    Ok(())
}
