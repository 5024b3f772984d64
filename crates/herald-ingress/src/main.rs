//! `herald-ingress`: the REST gateway.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: herald_ingress::IngressConfig = herald_config::load(None)?;
    let _telemetry = herald_telemetry::init("herald-ingress", &config.telemetry);
    let listener = tokio::net::TcpListener::bind(&config.ingress.listen).await?;
    herald_ingress::run(config, listener, herald_config::shutdown_on_signal()).await?;
    Ok(())
}
