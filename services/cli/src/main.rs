//! `medallion`: run a local Medallion stack, apply pipeline specs, trigger and watch runs,
//! and read any layer's tables over Arrow Flight.

mod bench;
mod bench_cdc;
mod demo;
mod display;
mod stack;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use medallion_proto::v1::{self as pb, pipeline_service_client::PipelineServiceClient};
use tonic::{codegen::InterceptedService, transport::Channel};

#[derive(Parser)]
#[command(
    name = "medallion",
    version,
    about = "Medallion: bronze -> silver -> gold pipelines on four services"
)]
struct Cli {
    /// Coordinator gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "MEDALLION_COORDINATOR",
        default_value = "http://127.0.0.1:50060"
    )]
    coordinator: String,
    /// Bearer token for the coordinator's API, when it requires one.
    #[arg(
        long,
        global = true,
        env = "MEDALLION_API_TOKEN",
        hide_env_values = true
    )]
    api_token: Option<String>,
    #[command(flatten)]
    tls: medallion_server::TlsOptions,
    #[command(subcommand)]
    command: Command,
}

/// How this CLI reaches the services: the coordinator's bearer token and TLS settings.
#[derive(Clone, Default)]
pub struct Access {
    pub token: Option<String>,
    pub tls: medallion_server::TlsOptions,
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of the coordinator's pipeline API.
pub type Client = PipelineServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Subcommand)]
enum Command {
    /// Start the four services as child processes on local ports, with a local lake.
    Up(stack::StackArgs),
    /// Validate a pipeline spec and store it in the coordinator.
    Apply {
        /// YAML spec; relative source paths resolve against its folder.
        file: PathBuf,
    },
    /// Trigger a run of a pipeline.
    Run {
        pipeline: String,
        /// Follow the run live and print a summary when it ends; exit non-zero if it fails.
        #[arg(long)]
        wait: bool,
        /// Rebuild every table from all source files.
        #[arg(long)]
        full_refresh: bool,
        /// Only these tables (and what they read), e.g. gold.pricing_summary.
        #[arg(long = "table")]
        tables: Vec<String>,
    },
    /// Follow a run that is already going.
    Watch { run: String },
    /// Cancel a run.
    Cancel { run: String },
    /// List recent runs.
    Runs {
        /// Only this pipeline's runs.
        pipeline: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one run: its tasks, versions, rows and expectation results.
    Show { run: String },
    /// List the pipelines the coordinator holds.
    Pipelines,
    /// Show a pipeline: mode, schedule, and every table's latest version, age and Kafka lag.
    Status { pipeline: String },
    /// Pause a pipeline's schedule or streaming (a run in progress finishes).
    Pause { pipeline: String },
    /// Resume a paused pipeline.
    Resume { pipeline: String },
    /// Print a table (`layer.table`) read over Arrow Flight from its layer's service.
    Query(display::QueryArgs),
    /// Write TPC-H lineitem and orders CSV files (with headers) under DIR/data/{lineitem,orders}/.
    GenTpch {
        dir: PathBuf,
        #[arg(long, default_value_t = 0.01)]
        scale_factor: f64,
        /// Files per table.
        #[arg(long, default_value_t = 1)]
        parts: i32,
    },
    /// Benchmarks: `tpch` (the services against the same plan in one process) or `cdc`.
    Bench(bench::BenchArgs),
    /// Generate TPC-H data, start the services, run examples/tpch.yaml and print the gold tables.
    Demo(demo::DemoArgs),
}

/// Pauses or resumes a pipeline and says which.
async fn set_paused(
    coordinator: &str,
    access: &Access,
    pipeline: String,
    paused: bool,
) -> anyhow::Result<()> {
    let mut client = connect(coordinator, access).await?;
    let p = client
        .set_pipeline_paused(pb::SetPipelinePausedRequest {
            name: pipeline,
            paused,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    println!("{} {}", p.name, if p.paused { "paused" } else { "resumed" });
    Ok(())
}

async fn connect(endpoint: &str, access: &Access) -> anyhow::Result<Client> {
    let channel = medallion_server::endpoint(endpoint, &access.tls)
        .with_context(|| format!("invalid coordinator URL {endpoint}"))?
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the coordinator at {endpoint} (is `medallion up` running?)")
        })?;
    let bearer = match &access.token {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse()
                .context("the API token must be printable ASCII")?,
        ),
        None => None,
    };
    Ok(
        PipelineServiceClient::with_interceptor(channel, Bearer(bearer))
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}

/// Reads a spec file and applies it with its folder as the base of relative source paths.
pub async fn apply_file(
    client: &mut Client,
    file: &std::path::Path,
) -> anyhow::Result<pb::Pipeline> {
    let spec_yaml =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let base = std::fs::canonicalize(file)
        .ok()
        .and_then(|p| p.parent().map(|d| d.display().to_string()))
        .unwrap_or_default();
    apply_text(client, spec_yaml, base).await
}

pub async fn apply_text(
    client: &mut Client,
    spec_yaml: String,
    base_dir: String,
) -> anyhow::Result<pb::Pipeline> {
    let response = client
        .apply_pipeline(pb::ApplyPipelineRequest {
            spec_yaml,
            base_dir,
        })
        .await;
    match response {
        Ok(r) => Ok(r.into_inner()),
        Err(status) => anyhow::bail!("spec rejected: {}", status.message()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let access = Access {
        token: cli.api_token.clone(),
        tls: cli.tls.clone(),
    };
    match cli.command {
        Command::Up(args) => stack::up(args).await,
        Command::Apply { file } => {
            let mut client = connect(&cli.coordinator, &access).await?;
            let p = apply_file(&mut client, &file).await?;
            println!(
                "applied pipeline {} (revision {}) with {} tables",
                p.name,
                p.revision,
                p.tables.len()
            );
            for t in &p.tables {
                let deps: Vec<String> = t.depends_on.iter().map(display::table_name).collect();
                let name = t
                    .table
                    .as_ref()
                    .map(display::table_name)
                    .unwrap_or_default();
                if deps.is_empty() {
                    println!("  {name}");
                } else {
                    println!("  {name} <- {}", deps.join(", "));
                }
            }
            Ok(())
        }
        Command::Run {
            pipeline,
            wait,
            full_refresh,
            tables,
        } => {
            let mut client = connect(&cli.coordinator, &access).await?;
            let run = client
                .trigger_run(pb::TriggerRunRequest {
                    pipeline,
                    full_refresh,
                    tables,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            println!("run {} started", run.id);
            if wait {
                display::watch(&mut client, &run.id).await?;
            }
            Ok(())
        }
        Command::Watch { run } => {
            let mut client = connect(&cli.coordinator, &access).await?;
            display::watch(&mut client, &run).await
        }
        Command::Cancel { run } => {
            let mut client = connect(&cli.coordinator, &access).await?;
            client
                .cancel_run(pb::CancelRunRequest {
                    run_id: run.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            println!("cancellation of run {run} requested");
            Ok(())
        }
        Command::Runs { pipeline, limit } => {
            let mut client = connect(&cli.coordinator, &access).await?;
            let runs = client
                .list_runs(pb::ListRunsRequest {
                    pipeline: pipeline.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner()
                .runs;
            display::print_runs(&runs);
            Ok(())
        }
        Command::Show { run } => {
            let mut client = connect(&cli.coordinator, &access).await?;
            let run = client
                .get_run(pb::GetRunRequest { run_id: run })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            display::print_run(&run);
            Ok(())
        }
        Command::Pipelines => {
            let mut client = connect(&cli.coordinator, &access).await?;
            let list = client
                .list_pipelines(pb::ListPipelinesRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            for p in list.pipelines {
                let active = if p.active_run_id.is_empty() {
                    String::new()
                } else {
                    format!("  running {}", p.active_run_id)
                };
                let paused = if p.paused { "  paused" } else { "" };
                println!(
                    "{:<24} revision {:<4} {:<9} {} tables{paused}{active}",
                    p.name,
                    p.revision,
                    p.mode,
                    p.tables.len()
                );
            }
            Ok(())
        }
        Command::Status { pipeline } => {
            let mut client = connect(&cli.coordinator, &access).await?;
            let p = client
                .get_pipeline(pb::GetPipelineRequest { name: pipeline })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            display::print_status(&p);
            Ok(())
        }
        Command::Pause { pipeline } => set_paused(&cli.coordinator, &access, pipeline, true).await,
        Command::Resume { pipeline } => {
            set_paused(&cli.coordinator, &access, pipeline, false).await
        }
        Command::Query(args) => display::query(args, &access.tls).await,
        Command::GenTpch {
            dir,
            scale_factor,
            parts,
        } => {
            tokio::task::spawn_blocking(move || demo::generate_tpch(&dir, scale_factor, parts))
                .await?
        }
        Command::Bench(args) => bench::bench(args).await,
        Command::Demo(args) => demo::demo(args).await,
    }
}
