//! `herald-sender`: delivery workers for the configured channels.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: herald_sender::SenderConfig = herald_config::load(None)?;
    let _telemetry = herald_telemetry::init("herald-sender", &config.telemetry);
    herald_sender::run(config, herald_config::shutdown_on_signal()).await?;
    Ok(())
}
