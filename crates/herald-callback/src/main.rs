//! `herald-callback`: provider callbacks in, status projector.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: herald_callback::CallbackConfig = herald_config::load(None)?;
    let _telemetry = herald_telemetry::init("herald-callback", &config.telemetry);
    let listener = tokio::net::TcpListener::bind(&config.callback.listen).await?;
    herald_callback::run(config, listener, herald_config::shutdown_on_signal()).await?;
    Ok(())
}
