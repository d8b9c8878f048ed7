//! The coordinator: Medallion's only public control API. It stores pipeline specs and run
//! history, plans each run's DAG and drives the layer services' stage API. It never touches
//! data rows.

mod api;
mod engine;
mod schedule;
mod store;

use std::sync::Arc;

use medallion_server::CancellationToken;
use tonic::transport::Endpoint;

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
}

fn channel(url: &str) -> anyhow::Result<tonic::transport::Channel> {
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| anyhow::anyhow!("invalid layer service URL `{url}`: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy())
}

/// Serves the pipeline API, resumes interrupted runs and fires schedules until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = store::Store::open(&config.state_dir)?;
    let endpoints = engine::LayerEndpoints {
        ingestor: channel(&config.ingestor)?,
        refiner: channel(&config.refiner)?,
        aggregator: channel(&config.aggregator)?,
    };
    let engine = engine::Engine::open(store, endpoints, shutdown.clone())?;
    engine.resume();
    tokio::spawn(schedule::run_scheduler(engine.clone(), shutdown.clone()));
    let listener = medallion_server::bind(&config.listen).await?;
    let api = api::PipelineApi {
        engine: Arc::clone(&engine),
    };
    let routes = tonic::service::Routes::new(
        medallion_proto::v1::pipeline_service_server::PipelineServiceServer::new(api),
    );
    medallion_server::serve(
        listener,
        routes,
        &["medallion.v1.PipelineService"],
        shutdown,
    )
    .await?;
    Ok(())
}
