//! A local Redshift Data API endpoint on PostgreSQL, for running Medallion's Redshift path
//! against a laptop: point the aggregator's `--redshift-data-endpoint` at it. See
//! `medallion_tests::redshift_data` for what it does and does not do.

use clap::Parser;

/// Serves the Redshift Data API's JSON protocol, executing statements on PostgreSQL and
/// loading `COPY … FORMAT AS PARQUET` from S3 (configured like the Medallion services).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50090")]
    listen: String,
    /// PostgreSQL the statements run on.
    #[arg(long, env = "MEDALLION_REDSHIFT_LOCAL_POSTGRES")]
    postgres: String,
    #[command(flatten)]
    s3: medallion_objects::S3Options,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(&cli.listen).await?;
    let objects = medallion_objects::ObjectStore::connect(cli.s3).await;
    eprintln!(
        "redshift-data-local listening on {}",
        listener.local_addr()?
    );
    medallion_tests::redshift_data::serve(listener, cli.postgres, objects).await;
    Ok(())
}
