use clap::Parser;

/// Medallion ingestor: the bronze layer service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: medallion_ingestor::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = medallion_telemetry::init("medallion-ingestor");
    let shutdown = medallion_server::shutdown_on_signals();
    let result = medallion_ingestor::run(cli.config, shutdown).await;
    telemetry.shutdown().await;
    result
}
