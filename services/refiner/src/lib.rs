//! The silver layer: reads bronze over the ingestor's Arrow Flight, applies the spec's typed
//! columns, filter, expectations, de-duplication and join (or SQL) with polars, and commits
//! `silver/<table>` (and `quarantine/<table>`) as one Delta commit each. Change events of a
//! Debezium source are applied by key instead (SCD type 1 or 2, see `apply`). Serves silver
//! and quarantine over Arrow Flight.

mod apply;
mod buckets;
mod refine;
mod row_schema;
pub mod transform;

use medallion_lake::Lake;
use medallion_server::CancellationToken;
use medallion_spec::Layer;

/// Refiner settings; every flag also reads an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address the gRPC stage API and Arrow Flight listen on.
    #[arg(
        long,
        env = "MEDALLION_REFINER_LISTEN",
        default_value = "127.0.0.1:50062"
    )]
    pub listen: String,
    /// Lake root: a local folder, a file:// URL or s3://bucket/prefix.
    #[arg(long, env = "MEDALLION_LAKE", default_value = "./.medallion/lake")]
    pub lake: String,
    /// Arrow Flight endpoint of the ingestor (bronze is read only through it).
    #[arg(
        long,
        env = "MEDALLION_BRONZE_FLIGHT",
        default_value = "http://127.0.0.1:50061"
    )]
    pub bronze_flight: String,
    /// Tasks this replica runs at once (each holds its tables in memory); more wait their turn.
    #[arg(long, env = "MEDALLION_REFINER_MAX_TASKS", default_value_t = 1)]
    pub max_tasks: usize,
    /// Input rows per bucket: a de-duplicated or joined table with more input rows is split
    /// by key into buckets on local disk and refined one bucket at a time, so its own rows are
    /// in memory a bucket at a time rather than whole.
    #[arg(long, env = "MEDALLION_REFINER_BUCKET_ROWS", default_value_t = 250_000,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub bucket_rows: u64,
    /// Folder the bucket files are written to (default: the system temp folder).
    #[arg(long, env = "MEDALLION_SPOOL_DIR")]
    pub spool_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub s3: medallion_objects::S3Options,
    #[command(flatten)]
    pub service: medallion_server::ServiceOptions,
}

/// Serves the stage API and silver and quarantine Flight until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    medallion_frames::log_polars_warnings();
    let lake = Lake::connect(&config.lake, &config.s3).await?;
    let listener = medallion_server::bind(&config.listen).await?;
    let spool_dir = config.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    let swept = buckets::sweep(&spool_dir);
    if swept > 0 {
        tracing::info!(swept, spool_dir = %spool_dir.display(), "removed spill folders left by an earlier run");
    }
    let runner = refine::Refiner {
        lake: lake.clone(),
        bronze_flight: medallion_flight::FlightReader::new(
            medallion_server::channel(&config.bronze_flight, &config.service.tls)?,
            &config.bronze_flight,
        ),
        spool_dir,
        bucket_rows: config.bucket_rows,
    };
    medallion_stage::serve_layer(
        runner,
        config.max_tasks,
        lake,
        vec![Layer::Silver, Layer::Quarantine],
        listener,
        &config.service,
        shutdown,
    )
    .await?;
    Ok(())
}
