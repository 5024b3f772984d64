//! Metrics and the admin listener every service can serve: `/metrics` (Prometheus text),
//! `/healthz` (the process answers) and `/readyz` (its dependencies answer).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Buckets for every `*_seconds` histogram: 1 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle; `None` if
/// another recorder was installed first (tests with their own).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// A readiness check: resolves to `Ok` with notes worth showing (an open circuit breaker: the
/// service is fine, a provider is not) when the service's dependencies answer, else `Err`
/// with the names of those that do not.
pub type ReadyCheck = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<String>, Vec<String>>> + Send>>
        + Send
        + Sync,
>;

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    ready: ReadyCheck,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let handle = metrics_handle();
    // Keeps histograms' windows bounded even if nobody scrapes.
    if let Some(handle) = handle.clone() {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => handle.run_upkeep(),
                }
            }
        });
    }
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move {
                    match handle {
                        Some(handle) => (
                            StatusCode::OK,
                            [("content-type", "text/plain; version=0.0.4")],
                            handle.render(),
                        )
                            .into_response(),
                        None => (StatusCode::NOT_FOUND, "metrics recorder not installed")
                            .into_response(),
                    }
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = ready.clone();
                async move {
                    match ready().await {
                        Ok(notes) if notes.is_empty() => (StatusCode::OK, "ready".to_string()),
                        Ok(notes) => (StatusCode::OK, format!("ready; {}", notes.join("; "))),
                        Err(failing) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {}", failing.join(", ")),
                        ),
                    }
                }
            }),
        );
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "admin listener (metrics, health)");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds `settings.admin_listen` (when set) and serves the admin endpoints there until
/// `shutdown`. A bind failure is returned: a port clash must not go unnoticed.
pub async fn spawn_admin(
    settings: &crate::TelemetrySettings,
    ready: ReadyCheck,
    shutdown: CancellationToken,
) -> std::io::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    let Some(address) = settings.admin_listen.as_deref().filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(address).await?;
    Ok(Some(tokio::spawn(serve_admin(listener, ready, shutdown))))
}
