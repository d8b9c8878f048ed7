//! The gold layer: reads silver over the refiner's Arrow Flight, computes each gold table
//! with polars SQL, commits `gold/<table>` as one Delta commit and loads it into the
//! warehouse. Serves gold over Arrow Flight.

mod aggregate;
mod shared_reads;
mod touched;

/// Computes a gold table from its silver inputs (also used by `medallion bench` in one process).
pub use aggregate::compute;

use medallion_lake::Lake;
use medallion_server::CancellationToken;
use medallion_spec::Layer;

/// Aggregator settings; every flag also reads an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address the gRPC stage API and Arrow Flight listen on.
    #[arg(
        long,
        env = "MEDALLION_AGGREGATOR_LISTEN",
        default_value = "127.0.0.1:50063"
    )]
    pub listen: String,
    /// Lake root: a local folder, a file:// URL or s3://bucket/prefix.
    #[arg(long, env = "MEDALLION_LAKE", default_value = "./.medallion/lake")]
    pub lake: String,
    /// Arrow Flight endpoint of the refiner (silver is read only through it).
    #[arg(
        long,
        env = "MEDALLION_SILVER_FLIGHT",
        default_value = "http://127.0.0.1:50062"
    )]
    pub silver_flight: String,
    /// Tasks this replica runs at once (each holds its tables in memory); more wait their turn.
    #[arg(long, env = "MEDALLION_AGGREGATOR_MAX_TASKS", default_value_t = 1)]
    pub max_tasks: usize,
    /// Redshift Data API endpoint override (e.g. a local development endpoint); by default the
    /// AWS endpoint of the region (or AWS_ENDPOINT_URL_REDSHIFT_DATA).
    #[arg(long, env = "MEDALLION_REDSHIFT_DATA_ENDPOINT")]
    pub redshift_data_endpoint: Option<String>,
    /// Folder staged Parquet files are written to before upload (default: the system temp folder).
    #[arg(long, env = "MEDALLION_SPOOL_DIR")]
    pub spool_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub s3: medallion_objects::S3Options,
    #[command(flatten)]
    pub service: medallion_server::ServiceOptions,
}

/// Serves the stage API and gold Flight until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    medallion_frames::log_polars_warnings();
    let lake = Lake::connect(&config.lake, &config.s3).await?;
    let listener = medallion_server::bind(&config.listen).await?;
    let runner = aggregate::Aggregator {
        lake: lake.clone(),
        silver_flight: medallion_flight::FlightReader::new(
            medallion_server::channel(&config.silver_flight, &config.service.tls)?,
            &config.silver_flight,
        ),
        s3: config.s3.clone(),
        objects: tokio::sync::OnceCell::new(),
        redshift_data_endpoint: config.redshift_data_endpoint.clone(),
        spool_dir: config.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
        shared_reads: Default::default(),
    };
    medallion_stage::serve_layer(
        runner,
        config.max_tasks,
        lake,
        vec![Layer::Gold],
        listener,
        &config.service,
        shutdown,
    )
    .await?;
    Ok(())
}
