//! Test support: a Medallion cluster of the four real service binaries on loopback ports,
//! each test with its own lake, state and ports; plus an independent TPC-H reference.

pub mod api;
pub mod certs;
pub mod kafka;
pub mod otlp;
pub mod redshift_data;
pub mod reference;
pub mod s3;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use arrow::record_batch::RecordBatch;
use arrow_flight::{FlightClient, FlightDescriptor};
use futures::TryStreamExt;
use medallion_proto::v1::{self as pb, pipeline_service_client::PipelineServiceClient};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// The folder holding the workspace's binaries (next to this test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile folder")
        .to_path_buf();
    for bin in [
        "medallion",
        "medallion-coordinator",
        "medallion-ingestor",
        "medallion-refiner",
        "medallion-aggregator",
    ] {
        assert!(
            dir.join(bin).exists(),
            "{bin} is not built in {}; run `cargo build --workspace --bins` before the tests (tests/run.sh does)",
            dir.display()
        );
    }
    dir
}

/// The workspace root (for examples/).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A PostgreSQL URL for warehouse tests (`MEDALLION_TEST_PG_URL`, default the local test database).
pub fn postgres_url() -> String {
    std::env::var("MEDALLION_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Coordinator,
    Ingestor,
    Refiner,
    Aggregator,
}

impl Service {
    fn binary(self) -> &'static str {
        match self {
            Service::Coordinator => "medallion-coordinator",
            Service::Ingestor => "medallion-ingestor",
            Service::Refiner => "medallion-refiner",
            Service::Aggregator => "medallion-aggregator",
        }
    }
}

/// Certificates for a cluster with TLS on every endpoint (PEM files).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA every certificate chains to.
    pub ca: PathBuf,
    /// The services' certificate (for 127.0.0.1 and localhost, server and client usage).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The test's own client certificate.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Mutual TLS: every service requires a client certificate.
    pub mutual: bool,
}

/// How a test cluster is set up beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// PostgreSQL URL the aggregator loads gold into.
    pub warehouse: Option<String>,
    /// Extra environment for every service process.
    pub env: Vec<(String, String)>,
    /// Serve Prometheus metrics on a free port per service.
    pub metrics: bool,
    pub tls: Option<TlsFiles>,
    /// Bearer token the coordinator requires (the cluster's own client sends it).
    pub api_token: Option<String>,
    /// Refiner processes (at least one); the others reach them all through one URL list.
    pub refiners: usize,
    /// Ingestor processes (at least one), likewise.
    pub ingestors: usize,
    /// Lake root for every service (an `s3://` URL, say); default: a folder of the cluster's.
    pub lake: Option<String>,
}

/// Sends `authorization: Bearer <token>` when the cluster's coordinator requires a token.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
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

/// The test's client of the coordinator's pipeline API.
pub type Client = PipelineServiceClient<tonic::codegen::InterceptedService<Channel, BearerToken>>;

/// Four service processes sharing one lake in a temporary folder.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    ports: [u16; 4],
    /// Ports of refiner replicas after the first.
    more_refiners: Vec<u16>,
    /// Ports of ingestor replicas after the first.
    more_ingestors: Vec<u16>,
    metrics_ports: [u16; 4],
    children: Vec<(Service, usize, Child)>,
    options: ClusterOptions,
}

impl Cluster {
    pub async fn start(warehouse: Option<String>) -> anyhow::Result<Cluster> {
        Cluster::start_with(ClusterOptions {
            warehouse,
            ..ClusterOptions::default()
        })
        .await
    }

    pub async fn start_with(options: ClusterOptions) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("logs"))?;
        let mut cluster = Cluster {
            dir,
            ports: [free_port(), free_port(), free_port(), free_port()],
            more_refiners: (1..options.refiners).map(|_| free_port()).collect(),
            more_ingestors: (1..options.ingestors).map(|_| free_port()).collect(),
            metrics_ports: [free_port(), free_port(), free_port(), free_port()],
            children: Vec::new(),
            options,
        };
        for (s, replica) in cluster.processes() {
            cluster.spawn_replica(s, replica)?;
        }
        for (s, replica) in cluster.processes() {
            cluster.wait_replica_healthy(s, replica).await?;
        }
        Ok(cluster)
    }

    pub fn lake_dir(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Every process of the cluster in start order: (service, replica).
    fn processes(&self) -> Vec<(Service, usize)> {
        let mut all: Vec<(Service, usize)> = (0..=self.more_ingestors.len())
            .map(|r| (Service::Ingestor, r))
            .collect();
        all.extend((0..=self.more_refiners.len()).map(|r| (Service::Refiner, r)));
        all.extend([(Service::Aggregator, 0), (Service::Coordinator, 0)]);
        all
    }

    fn port(&self, s: Service, replica: usize) -> u16 {
        match (s, replica) {
            (_, 0) => self.ports[s as usize],
            (Service::Ingestor, r) => self.more_ingestors[r - 1],
            (_, r) => self.more_refiners[r - 1],
        }
    }

    /// The URL of one replica of a service.
    pub fn replica_url(&self, s: Service, replica: usize) -> String {
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port(s, replica))
    }

    /// The URL of a service's first replica.
    pub fn url(&self, s: Service) -> String {
        self.replica_url(s, 0)
    }

    /// Every replica's URL, comma-separated, as the other services are configured with.
    pub fn urls(&self, s: Service) -> String {
        let replicas = match s {
            Service::Refiner => self.more_refiners.len() + 1,
            Service::Ingestor => self.more_ingestors.len() + 1,
            _ => 1,
        };
        (0..replicas)
            .map(|r| self.replica_url(s, r))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where a service serves `/metrics` (with [`ClusterOptions::metrics`]).
    pub fn metrics_addr(&self, s: Service) -> String {
        format!("127.0.0.1:{}", self.metrics_ports[s as usize])
    }

    /// A channel to a service as the test's own client: with the client certificate under TLS.
    pub async fn channel(&self, s: Service) -> anyhow::Result<Channel> {
        self.replica_channel(s, 0).await
    }

    async fn replica_channel(&self, s: Service, replica: usize) -> anyhow::Result<Channel> {
        let mut endpoint = Channel::from_shared(self.replica_url(s, replica))?;
        if let Some(tls) = &self.options.tls {
            medallion_server::install_crypto_provider();
            let config = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(
                    &tls.ca,
                )?))
                .identity(tonic::transport::Identity::from_pem(
                    std::fs::read(&tls.client_cert)?,
                    std::fs::read(&tls.client_key)?,
                ));
            endpoint = endpoint.tls_config(config)?;
        }
        Ok(endpoint.connect().await?)
    }

    fn spawn_replica(&mut self, s: Service, replica: usize) -> anyhow::Result<()> {
        let listen = format!("127.0.0.1:{}", self.port(s, replica));
        let lake = self
            .options
            .lake
            .clone()
            .unwrap_or_else(|| self.lake_dir().display().to_string());
        let args: Vec<String> = match s {
            Service::Ingestor => vec!["--listen".into(), listen, "--lake".into(), lake],
            Service::Refiner => vec![
                "--listen".into(),
                listen,
                "--lake".into(),
                lake,
                "--bronze-flight".into(),
                self.urls(Service::Ingestor),
            ],
            Service::Aggregator => vec![
                "--listen".into(),
                listen,
                "--lake".into(),
                lake,
                "--silver-flight".into(),
                self.urls(Service::Refiner),
            ],
            Service::Coordinator => vec![
                "--listen".into(),
                listen,
                "--state-dir".into(),
                self.dir.path().join("state").display().to_string(),
                "--ingestor".into(),
                self.urls(Service::Ingestor),
                "--refiner".into(),
                self.urls(Service::Refiner),
                "--aggregator".into(),
                self.url(Service::Aggregator),
            ],
        };
        let log_path = self.log_path(s, replica);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut args = args;
        if self.options.metrics && replica == 0 {
            args.extend(["--metrics-listen".into(), self.metrics_addr(s)]);
        }
        if let Some(tls) = &self.options.tls {
            args.extend([
                "--tls-cert".into(),
                tls.cert.display().to_string(),
                "--tls-key".into(),
                tls.key.display().to_string(),
                "--tls-ca".into(),
                tls.ca.display().to_string(),
            ]);
            if tls.mutual {
                args.push("--tls-client-auth".into());
            }
        }
        let mut cmd = Command::new(bin_dir().join(s.binary()));
        cmd.envs(self.options.env.iter().cloned());
        if let (Service::Coordinator, Some(token)) = (s, &self.options.api_token) {
            cmd.env("MEDALLION_API_TOKEN", token);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        cmd.env_remove("MEDALLION_WAREHOUSE_URL");
        if let (Service::Aggregator, Some(w)) = (s, &self.options.warehouse) {
            cmd.env("MEDALLION_WAREHOUSE_URL", w);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", s.binary()))?;
        self.children.push((s, replica, child));
        Ok(())
    }

    fn log_path(&self, s: Service, replica: usize) -> PathBuf {
        let name = match replica {
            0 => format!("{}.log", s.binary()),
            r => format!("{}-{r}.log", s.binary()),
        };
        self.dir.path().join("logs").join(name)
    }

    /// Polls gRPC health until the service reports SERVING.
    pub async fn wait_healthy(&self, s: Service) -> anyhow::Result<()> {
        self.wait_replica_healthy(s, 0).await
    }

    /// Polls gRPC health until one replica reports SERVING.
    pub async fn wait_replica_healthy(&self, s: Service, replica: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let check = async {
                let channel = self.replica_channel(s, replica).await?;
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let status = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?
                    .into_inner()
                    .status;
                anyhow::Ok(
                    status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                )
            };
            if let Ok(true) = check.await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not healthy; log:\n{}",
                    s.binary(),
                    self.replica_log(s, replica)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self, s: Service) -> String {
        self.replica_log(s, 0)
    }

    pub fn replica_log(&self, s: Service, replica: usize) -> String {
        std::fs::read_to_string(self.log_path(s, replica)).unwrap_or_default()
    }

    /// SIGKILL of every replica of a service: no clean shutdown, as in a crash.
    pub async fn kill(&mut self, s: Service) {
        for (_, _, child) in self.children.iter_mut().filter(|(svc, _, _)| *svc == s) {
            let _ = child.kill().await;
        }
        self.children.retain(|(svc, _, _)| *svc != s);
    }

    /// SIGTERM to one replica, then wait for it to exit: a clean shutdown, as in a rollout.
    pub async fn stop_replica(&mut self, s: Service, replica: usize) -> anyhow::Result<()> {
        for (_, _, child) in self
            .children
            .iter_mut()
            .filter(|(svc, r, _)| *svc == s && *r == replica)
        {
            if let Some(pid) = child.id() {
                std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()?;
            }
            tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
                .await
                .context("the replica did not exit within 30 s of SIGTERM")??;
        }
        self.children
            .retain(|(svc, r, _)| !(*svc == s && *r == replica));
        Ok(())
    }

    /// SIGKILL of one replica.
    pub async fn kill_replica(&mut self, s: Service, replica: usize) {
        for (_, _, child) in self
            .children
            .iter_mut()
            .filter(|(svc, r, _)| *svc == s && *r == replica)
        {
            let _ = child.kill().await;
        }
        self.children
            .retain(|(svc, r, _)| !(*svc == s && *r == replica));
    }

    /// Starts one replica again (after [`Cluster::kill_replica`]), on its old port.
    pub async fn restart_replica(&mut self, s: Service, replica: usize) -> anyhow::Result<()> {
        self.spawn_replica(s, replica)?;
        self.wait_replica_healthy(s, replica).await
    }

    pub async fn restart(&mut self, s: Service) -> anyhow::Result<()> {
        self.spawn_replica(s, 0)?;
        self.wait_healthy(s).await
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        let channel = self.channel(Service::Coordinator).await?;
        let token = match &self.options.api_token {
            Some(t) => Some(format!("Bearer {t}").parse()?),
            None => None,
        };
        Ok(PipelineServiceClient::with_interceptor(
            channel,
            BearerToken(token),
        ))
    }

    /// Applies a spec whose relative source paths resolve against [`Cluster::data_dir`].
    pub async fn apply(&self, spec_yaml: &str) -> Result<pb::Pipeline, tonic::Status> {
        let mut client = self
            .client()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        client
            .apply_pipeline(pb::ApplyPipelineRequest {
                spec_yaml: spec_yaml.to_string(),
                base_dir: self.data_dir().display().to_string(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Starts a run without waiting for it: its id and its event stream from the first event.
    pub async fn start_run(
        &self,
        pipeline: &str,
    ) -> Result<(String, tonic::Streaming<pb::RunEvent>), tonic::Status> {
        self.start_run_with(pipeline, false).await
    }

    /// [`Cluster::start_run`], optionally as a full refresh.
    pub async fn start_run_with(
        &self,
        pipeline: &str,
        full_refresh: bool,
    ) -> Result<(String, tonic::Streaming<pb::RunEvent>), tonic::Status> {
        let mut client = self
            .client()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let run = client
            .trigger_run(pb::TriggerRunRequest {
                pipeline: pipeline.into(),
                full_refresh,
                tables: vec![],
            })
            .await?
            .into_inner();
        let events = client
            .watch_run(pb::WatchRunRequest {
                run_id: run.id.clone(),
            })
            .await?
            .into_inner();
        Ok((run.id, events))
    }

    /// Triggers a run and follows it to the end: the final run and every event seen.
    pub async fn run(
        &self,
        pipeline: &str,
        full_refresh: bool,
    ) -> anyhow::Result<(pb::Run, Vec<pb::RunEvent>)> {
        let mut client = self.client().await?;
        let run = client
            .trigger_run(pb::TriggerRunRequest {
                pipeline: pipeline.into(),
                full_refresh,
                tables: vec![],
            })
            .await?
            .into_inner();
        self.follow(&run.id).await
    }

    pub async fn follow(&self, run_id: &str) -> anyhow::Result<(pb::Run, Vec<pb::RunEvent>)> {
        let mut client = self.client().await?;
        let mut stream = client
            .watch_run(pb::WatchRunRequest {
                run_id: run_id.into(),
            })
            .await?
            .into_inner();
        let mut events = Vec::new();
        let deadline = Duration::from_secs(600);
        loop {
            let next = tokio::time::timeout(deadline, stream.message())
                .await
                .context("run did not finish in time")??;
            let Some(e) = next else { break };
            let done = matches!(e.event, Some(pb::run_event::Event::RunFinished(_)));
            events.push(e);
            if done {
                break;
            }
        }
        let run = client
            .get_run(pb::GetRunRequest {
                run_id: run_id.into(),
            })
            .await?
            .into_inner();
        Ok((run, events))
    }

    fn flight_service(layer: &str) -> Service {
        match layer {
            "bronze" => Service::Ingestor,
            "silver" | "quarantine" => Service::Refiner,
            _ => Service::Aggregator,
        }
    }

    /// Reads a whole table (`layer.table`) over Arrow Flight from its layer's service.
    pub async fn read(&self, table: &str) -> anyhow::Result<Vec<RecordBatch>> {
        let layer = table.split_once('.').context("layer.table")?.0;
        self.read_from(Self::flight_service(layer), 0, table).await
    }

    /// Reads a whole table over Arrow Flight from one replica of a service.
    pub async fn read_from(
        &self,
        s: Service,
        replica: usize,
        table: &str,
    ) -> anyhow::Result<Vec<RecordBatch>> {
        let (layer, name) = table.split_once('.').context("layer.table")?;
        let channel = self.replica_channel(s, replica).await?;
        let mut client = FlightClient::new(channel);
        let info = client
            .get_flight_info(FlightDescriptor::new_path(vec![layer.into(), name.into()]))
            .await?;
        let mut batches = Vec::new();
        for ep in info.endpoint {
            let ticket = ep.ticket.context("endpoint without ticket")?;
            let mut stream = client.do_get(ticket).await?;
            while let Some(b) = stream.try_next().await? {
                batches.push(b);
            }
        }
        Ok(batches)
    }

    /// Generates TPC-H CSV files with the `medallion gen-tpch` command into `dir`.
    pub async fn gen_tpch(dir: &Path, scale_factor: f64, parts: u32) -> anyhow::Result<()> {
        let status = Command::new(bin_dir().join("medallion"))
            .args([
                "gen-tpch",
                &dir.display().to_string(),
                "--scale-factor",
                &scale_factor.to_string(),
                "--parts",
                &parts.to_string(),
            ])
            .status()
            .await?;
        if !status.success() {
            bail!("medallion gen-tpch failed: {status}");
        }
        Ok(())
    }
}

/// Reads a run's events until one about `table` satisfies `wanted`.
pub async fn wait_for_event(
    events: &mut tonic::Streaming<pb::RunEvent>,
    table: &str,
    wanted: impl Fn(&pb::run_event::Event) -> bool,
) {
    use pb::run_event::Event;
    loop {
        let e = events
            .message()
            .await
            .expect("event stream")
            .unwrap_or_else(|| panic!("run ended before the awaited event of {table}"));
        let Some(event) = &e.event else { continue };
        let about = match event {
            Event::TaskStarted(x) => x.table.as_ref(),
            Event::TaskProgress(x) => x.table.as_ref(),
            Event::TaskCommitted(x) => x.table.as_ref(),
            Event::TaskFailed(x) => x.table.as_ref(),
            _ => None,
        };
        if about.map(table_name).as_deref() == Some(table) && wanted(event) {
            return;
        }
    }
}

/// A task of a run by table name (`silver.lineitem`).
pub fn task<'a>(run: &'a pb::Run, table: &str) -> &'a pb::Task {
    run.tasks
        .iter()
        .find(|t| t.table.as_ref().is_some_and(|id| table_name(id) == table))
        .unwrap_or_else(|| panic!("run has no task {table}"))
}

pub fn table_name(id: &pb::TableId) -> String {
    let layer = match pb::Layer::try_from(id.layer) {
        Ok(pb::Layer::Bronze) => "bronze",
        Ok(pb::Layer::Silver) => "silver",
        Ok(pb::Layer::Gold) => "gold",
        Ok(pb::Layer::Quarantine) => "quarantine",
        _ => "?",
    };
    format!("{layer}.{}", id.name)
}

pub fn succeeded(run: &pb::Run) -> bool {
    run.state == pb::RunState::Succeeded as i32
}

/// A unique lowercase name for per-test schemas and pipelines.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// Typed reads of single values from Arrow batches, for assertions.
pub mod values {
    use arrow::{
        array::{Array, AsArray},
        datatypes::{DataType, Decimal128Type, Float64Type, Int32Type, Int64Type},
        record_batch::RecordBatch,
    };

    fn column<'a>(batch: &'a RecordBatch, name: &str) -> &'a dyn Array {
        batch
            .column_by_name(name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", batch.schema()))
            .as_ref()
    }

    pub fn string(batch: &RecordBatch, name: &str, row: usize) -> Option<String> {
        let c = column(batch, name);
        if c.is_null(row) {
            return None;
        }
        Some(match c.data_type() {
            DataType::Utf8 => c.as_string::<i32>().value(row).to_string(),
            DataType::LargeUtf8 => c.as_string::<i64>().value(row).to_string(),
            DataType::Utf8View => c.as_string_view().value(row).to_string(),
            other => panic!("{name} is {other}, not a string"),
        })
    }

    /// A decimal column's value as an integer count of 10^-scale units (rescaled exactly).
    pub fn decimal(batch: &RecordBatch, name: &str, row: usize, scale: i8) -> i128 {
        let c = column(batch, name);
        let DataType::Decimal128(_, s) = c.data_type() else {
            panic!("{name} is {}, not a decimal", c.data_type())
        };
        let v = c.as_primitive::<Decimal128Type>().value(row);
        let diff = i32::from(scale) - i32::from(*s);
        if diff >= 0 {
            v * 10i128.pow(diff as u32)
        } else {
            let d = 10i128.pow((-diff) as u32);
            assert_eq!(
                v % d,
                0,
                "{name}={v} (scale {s}) is not exact at scale {scale}"
            );
            v / d
        }
    }

    pub fn float(batch: &RecordBatch, name: &str, row: usize) -> f64 {
        column(batch, name).as_primitive::<Float64Type>().value(row)
    }

    pub fn int(batch: &RecordBatch, name: &str, row: usize) -> i64 {
        let c = column(batch, name);
        match c.data_type() {
            DataType::Int64 => c.as_primitive::<Int64Type>().value(row),
            DataType::Int32 => i64::from(c.as_primitive::<Int32Type>().value(row)),
            other => panic!("{name} is {other}, not an integer"),
        }
    }

    pub fn rows(batches: &[RecordBatch]) -> usize {
        batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// Fetches `GET /metrics` from a service's metrics address: the Prometheus text.
pub async fn scrape_metrics(addr: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics from {addr}: {head}");
    }
    Ok(body.to_string())
}

/// The value of one sample (`name{labels} value`) whose line contains every `parts`.
pub fn metric_value(text: &str, name: &str, parts: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
