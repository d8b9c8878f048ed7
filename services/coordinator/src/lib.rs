//! The coordinator: Medallion's only public control API. It stores pipeline specs and run
//! history, plans each run's DAG and drives the layer services' stage API. It never touches
//! data rows.

mod api;
mod engine;
mod schedule;
mod store;

use std::sync::Arc;

use medallion_server::CancellationToken;

/// Coordinator settings; every flag also reads an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address the public gRPC API listens on.
    #[arg(
        long,
        env = "MEDALLION_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:50060"
    )]
    pub listen: String,
    /// Folder of the embedded store (pipelines and run history).
    #[arg(
        long,
        env = "MEDALLION_STATE_DIR",
        default_value = "./.medallion/state"
    )]
    pub state_dir: String,
    /// Stage API of the ingestor (bronze).
    #[arg(
        long,
        env = "MEDALLION_INGESTOR_URL",
        default_value = "http://127.0.0.1:50061"
    )]
    pub ingestor: String,
    /// Stage API of the refiner (silver).
    #[arg(
        long,
        env = "MEDALLION_REFINER_URL",
        default_value = "http://127.0.0.1:50062"
    )]
    pub refiner: String,
    /// Stage API of the aggregator (gold).
    #[arg(
        long,
        env = "MEDALLION_AGGREGATOR_URL",
        default_value = "http://127.0.0.1:50063"
    )]
    pub aggregator: String,
    /// Bearer token every PipelineService call must carry (`authorization: Bearer <token>`).
    /// Health checks and reflection stay open. Off when unset.
    #[arg(long, env = "MEDALLION_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Folder of pipeline specs (`*.yaml`, `*.yml`) applied at start, e.g. a mounted
    /// ConfigMap. A spec that fails validation stops the start, naming the file.
    #[arg(long, env = "MEDALLION_PIPELINES_DIR")]
    pub pipelines_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub service: medallion_server::ServiceOptions,
}

/// Serves the pipeline API, resumes interrupted runs and fires schedules until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if config
        .api_token
        .as_deref()
        .is_some_and(|t| t.trim().is_empty())
    {
        anyhow::bail!("MEDALLION_API_TOKEN (--api-token) is set but empty");
    }
    let store = store::Store::open(&config.state_dir)?;
    let (ingestor, ingestor_replicas) =
        medallion_server::channel_and_replicas(&config.ingestor, &config.service.tls)?;
    let endpoints = engine::LayerEndpoints {
        ingestor,
        ingestor_replicas,
        refiner: medallion_server::channel(&config.refiner, &config.service.tls)?,
        aggregator: medallion_server::channel(&config.aggregator, &config.service.tls)?,
    };
    let engine = engine::Engine::open(store, endpoints, shutdown.clone())?;
    if let Some(dir) = &config.pipelines_dir {
        apply_folder(&engine, dir)?;
    }
    engine.resume();
    tokio::spawn(schedule::run_scheduler(engine.clone(), shutdown.clone()));
    let listener = medallion_server::bind(&config.listen).await?;
    let api = api::PipelineApi {
        engine: Arc::clone(&engine),
    };
    let api = medallion_proto::v1::pipeline_service_server::PipelineServiceServer::new(api);
    let routes = tonic::service::Routes::new(tonic::service::interceptor::InterceptedService::new(
        api,
        api::BearerAuth::new(config.api_token.clone()),
    ));
    medallion_server::serve(
        listener,
        routes,
        &["medallion.v1.PipelineService"],
        &config.service,
        shutdown,
    )
    .await?;
    Ok(())
}

/// Applies every spec file of `dir` (sorted by name), skipping specs that are already applied
/// unchanged so a restart does not bump their revision.
fn apply_folder(engine: &engine::Engine, dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the pipelines folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let base_dir = dir.display().to_string();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let name = medallion_spec::Pipeline::parse(&text)
            .map(|p| p.spec.name.clone())
            .with_context(|| format!("{}", file.display()))?;
        if let Ok(current) = engine.pipeline(&name)
            && current.spec_yaml == text
            && current.base_dir == base_dir
        {
            continue;
        }
        let record = engine
            .apply(&text, &base_dir)
            .with_context(|| format!("{}", file.display()))?;
        tracing::info!(pipeline = %record.name, revision = record.revision, file = %file.display(), "applied");
    }
    Ok(())
}
