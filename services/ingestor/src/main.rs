use clap::Parser;

/// Medallion ingestor: the bronze layer service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: medallion_ingestor::Config,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    medallion_server::memory::runtime()?.block_on(serve(cli))
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let telemetry = medallion_telemetry::init("medallion-ingestor");
    let shutdown = medallion_server::shutdown_on_signals();
    let result = medallion_ingestor::run(cli.config, shutdown).await;
    telemetry.shutdown().await;
    result
}
