//! The bronze layer: reads source files exactly as they are, adds lineage columns and commits
//! them to `bronze/<source>` as one Delta commit per task. It remembers which files it took in
//! (path, size and modification time, or an S3 object's URL, size and ETag, are tags on the
//! data files they became), so the next run ingests only new or changed files; an HTTP API
//! source's incremental cursor is kept the same way. Serves bronze over Arrow Flight.

mod csv_file;
pub mod debezium;
mod env;
pub mod group;
pub mod http;
pub mod ingest;
mod json_fields;
pub mod kafka;
pub mod sources;

use medallion_lake::Lake;
use medallion_server::CancellationToken;
use medallion_spec::Layer;

/// Ingestor settings; every flag also reads an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address the gRPC stage API and Arrow Flight listen on.
    #[arg(
        long,
        env = "MEDALLION_INGESTOR_LISTEN",
        default_value = "127.0.0.1:50061"
    )]
    pub listen: String,
    /// Lake root: a local folder, a file:// URL or s3://bucket/prefix.
    #[arg(long, env = "MEDALLION_LAKE", default_value = "./.medallion/lake")]
    pub lake: String,
    /// This replica's identity in Kafka consumer groups (static membership): a replica that
    /// restarts under the same identity takes its partitions back at once, with no rebalance.
    /// Default: the host name and the listen port. Must differ between replicas. Empty: dynamic
    /// membership.
    #[arg(long, env = "MEDALLION_INGESTOR_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Tasks this replica runs at once (each holds its tables in memory); more wait their turn.
    #[arg(long, env = "MEDALLION_INGESTOR_MAX_TASKS", default_value_t = 2)]
    pub max_tasks: usize,
    /// Folder S3 source objects are streamed to before parsing (default: the system temp folder).
    #[arg(long, env = "MEDALLION_SPOOL_DIR")]
    pub spool_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub s3: medallion_objects::S3Options,
    #[command(flatten)]
    pub service: medallion_server::ServiceOptions,
}

/// Serves the stage API and bronze Flight until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let lake = Lake::connect(&config.lake, &config.s3).await?;
    let listener = medallion_server::bind(&config.listen).await?;
    let instance = config
        .instance_id
        .clone()
        .unwrap_or_else(|| group::default_instance_id(&config.listen));
    let members = std::sync::Arc::new(group::Members::new(instance));
    let runner = ingest::Ingestor {
        lake: lake.clone(),
        s3: config.s3.clone(),
        objects: tokio::sync::OnceCell::new(),
        spool_dir: config.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
        members: members.clone(),
    };
    medallion_stage::serve_layer(
        runner,
        config.max_tasks,
        lake,
        vec![Layer::Bronze],
        listener,
        &config.service,
        shutdown,
    )
    .await?;
    // Commits or drops what the members hold and closes their consumers. Dynamic members
    // leave their groups now; static ones keep their partitions for a restart under the same
    // identity, or until their session times out.
    members.leave_all().await;
    Ok(())
}
