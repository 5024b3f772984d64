//! One Herald service as an OS process of its own, for the fault suite (`tests/e2e/fault.rs`):
//! the suite SIGKILLs and restarts it. Runs the services' library `run` functions the way
//! `heraldctl up` does, from a whole-deployment configuration in JSON.
//!
//! ```sh
//! herald-fault-service <ingress|renderer|sender|callback|token> <config.json>
//! ```
//!
//! Listen addresses must be fixed ports (a restarted service comes back where the others
//! and the sandbox expect it). SIGTERM or Ctrl-C stops the service gracefully.

use anyhow::{Context, bail};
use heraldctl::HeraldConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(service), Some(path)) = (args.next(), args.next()) else {
        bail!("usage: herald-fault-service <service> <config.json>");
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let config: HeraldConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;
    let _telemetry = herald_telemetry::init(&format!("herald-{service}"), &config.telemetry);

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut term) => {
                        term.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
            shutdown.cancel();
        }
    });

    let result = match service.as_str() {
        "ingress" => {
            let listener = bind(&config.ingress.listen).await?;
            herald_ingress::run(config.ingress(), listener, shutdown)
                .await
                .map_err(anyhow::Error::from)
        }
        "callback" => {
            let listener = bind(&config.callback.listen).await?;
            herald_callback::run(config.callback(), listener, shutdown)
                .await
                .map_err(anyhow::Error::from)
        }
        "renderer" => herald_renderer::run(config.renderer(), shutdown)
            .await
            .map_err(anyhow::Error::from),
        "sender" => herald_sender::run(config.sender(), shutdown)
            .await
            .map_err(anyhow::Error::from),
        "token" => {
            let listener = bind(&config.token.listen).await?;
            let token = herald_token::TokenService::new(config.token.clone()).await?;
            token
                .serve(listener, shutdown.cancelled_owned())
                .await
                .map_err(anyhow::Error::from)
        }
        other => bail!("unknown service `{other}`"),
    };
    if let Err(error) = &result {
        eprintln!("herald-fault-service {service}: {error:#}");
    }
    result
}

async fn bind(address: &str) -> anyhow::Result<TcpListener> {
    // A port just released by a killed process may linger in TIME_WAIT: tokio's listener
    // sets SO_REUSEADDR, so it binds at once.
    TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))
}
