use clap::Parser;

/// Medallion coordinator: the pipeline control API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: medallion_coordinator::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    medallion_server::init_logging();
    let cli = Cli::parse();
    let shutdown = medallion_server::shutdown_on_signals();
    medallion_coordinator::run(cli.config, shutdown).await
}
