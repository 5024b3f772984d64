//! `herald-renderer`: consumes requests, renders templates, publishes delivery jobs.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: herald_renderer::RendererConfig = herald_config::load(None)?;
    let _telemetry = herald_telemetry::init("herald-renderer", &config.telemetry);
    herald_renderer::run(config, herald_config::shutdown_on_signal()).await?;
    Ok(())
}
