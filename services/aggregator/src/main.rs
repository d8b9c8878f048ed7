use clap::Parser;

/// Medallion aggregator: the gold layer service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: medallion_aggregator::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    medallion_server::init_logging();
    let cli = Cli::parse();
    let shutdown = medallion_server::shutdown_on_signals();
    medallion_aggregator::run(cli.config, shutdown).await
}
