use clap::Parser;

/// Medallion coordinator: the pipeline control API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: medallion_coordinator::Config,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    medallion_server::memory::runtime()?.block_on(serve(cli))
}

async fn serve(cli: Cli) -> anyhow::Result<()> {
    let telemetry = medallion_telemetry::init("medallion-coordinator");
    let shutdown = medallion_server::shutdown_on_signals();
    let result = medallion_coordinator::run(cli.config, shutdown).await;
    telemetry.shutdown().await;
    result
}
