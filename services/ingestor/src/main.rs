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
    medallion_server::init_logging();
    let cli = Cli::parse();
    let shutdown = medallion_server::shutdown_on_signals();
    medallion_ingestor::run(cli.config, shutdown).await
}
