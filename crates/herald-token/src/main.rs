//! `herald-token`: the token service, configured by `[token]` (and `[telemetry]`) of herald.toml.

use anyhow::Context;
use herald_token::{TokenFile, TokenService};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let file: TokenFile = herald_config::load(None).context("loading configuration")?;
    let _telemetry = herald_telemetry::init("herald-token", &file.telemetry);
    let config = file.token;
    let listen = config.listen.clone();
    let service = TokenService::new(config)
        .await
        .context("starting the token service")?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(%listen, "token service listening");
    let shutdown = herald_config::shutdown_on_signal();
    let checked = service.clone();
    let ready: herald_telemetry::ReadyCheck = std::sync::Arc::new(move || {
        let service = checked.clone();
        Box::pin(async move {
            let readiness = service.readiness().await;
            if readiness.ready {
                Ok(Vec::new())
            } else {
                let mut failing: Vec<String> = readiness
                    .misconfigured_accounts
                    .iter()
                    .map(|a| format!("account {}", a.account))
                    .collect();
                if readiness.redis != "ok" {
                    failing.push("redis".into());
                }
                Err(failing)
            }
        })
    });
    herald_telemetry::spawn_admin(&file.telemetry, ready, shutdown.clone())
        .await
        .context("admin listener")?;
    service
        .serve(listener, shutdown.cancelled_owned())
        .await
        .context("serving")?;
    tracing::info!("token service stopped");
    Ok(())
}
