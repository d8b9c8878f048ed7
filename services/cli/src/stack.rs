//! A local stack: the four service binaries (found next to this executable) as child
//! processes on consecutive local ports, sharing one lake folder.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

#[derive(clap::Args, Clone, Debug)]
pub struct StackArgs {
    /// Lake root: a folder, or `s3://bucket/prefix` (S3 settings and credentials come from the
    /// environment the services inherit: MEDALLION_S3_*, AWS_*).
    #[arg(long, env = "MEDALLION_LAKE", default_value = "./.medallion/lake")]
    pub lake: String,
    /// Coordinator state folder (pipelines, run history) and service logs.
    #[arg(
        long,
        env = "MEDALLION_STATE_DIR",
        default_value = "./.medallion/state"
    )]
    pub state_dir: PathBuf,
    /// Ports used: coordinator, ingestor, refiner, aggregator from this one up.
    #[arg(long, env = "MEDALLION_BASE_PORT", default_value_t = 50060)]
    pub base_port: u16,
    /// PostgreSQL URL handed to the aggregator for warehouse loads.
    #[arg(long, env = "MEDALLION_WAREHOUSE_URL")]
    pub warehouse: Option<String>,
}

/// Endpoints of a running stack.
pub struct Stack {
    children: Vec<(String, Child)>,
    pub coordinator: String,
    pub ingestor: String,
    pub refiner: String,
    pub aggregator: String,
    pub logs: PathBuf,
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the medallion executable")?;
    let dir = exe
        .parent()
        .context("the medallion executable has no folder")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found next to {} (build the workspace: cargo build --workspace)",
            name,
            exe.display()
        );
    }
    Ok(path)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    std::fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))
}

impl Stack {
    pub async fn start(args: &StackArgs) -> anyhow::Result<Stack> {
        let lake_s = if args.lake.starts_with("s3://") {
            args.lake.clone()
        } else {
            absolute(Path::new(&args.lake))?.display().to_string()
        };
        let state = absolute(&args.state_dir)?;
        let logs = absolute(&state.join("logs"))?;
        let port = |i: u16| args.base_port + i;
        let addr = |i: u16| format!("127.0.0.1:{}", port(i));
        let url = |i: u16| format!("http://127.0.0.1:{}", port(i));
        let services: Vec<(&str, Vec<String>)> = vec![
            (
                "medallion-ingestor",
                vec!["--listen".into(), addr(1), "--lake".into(), lake_s.clone()],
            ),
            (
                "medallion-refiner",
                vec![
                    "--listen".into(),
                    addr(2),
                    "--lake".into(),
                    lake_s.clone(),
                    "--bronze-flight".into(),
                    url(1),
                ],
            ),
            (
                "medallion-aggregator",
                vec![
                    "--listen".into(),
                    addr(3),
                    "--lake".into(),
                    lake_s.clone(),
                    "--silver-flight".into(),
                    url(2),
                ],
            ),
            (
                "medallion-coordinator",
                vec![
                    "--listen".into(),
                    addr(0),
                    "--state-dir".into(),
                    state.display().to_string(),
                    "--ingestor".into(),
                    url(1),
                    "--refiner".into(),
                    url(2),
                    "--aggregator".into(),
                    url(3),
                ],
            ),
        ];
        let mut stack = Stack {
            children: Vec::new(),
            coordinator: url(0),
            ingestor: url(1),
            refiner: url(2),
            aggregator: url(3),
            logs: logs.clone(),
        };
        for (name, args_v) in services {
            let log_path = logs.join(format!("{name}.log"));
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("cannot create {}", log_path.display()))?;
            let mut cmd = Command::new(binary(name)?);
            cmd.args(&args_v)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true);
            if name == "medallion-aggregator" {
                match &args.warehouse {
                    Some(w) => cmd.env("MEDALLION_WAREHOUSE_URL", w),
                    None => cmd.env_remove("MEDALLION_WAREHOUSE_URL"),
                };
            }
            let child = cmd
                .spawn()
                .with_context(|| format!("cannot start {name}"))?;
            stack.children.push((name.to_string(), child));
        }
        for (name, endpoint) in [
            ("ingestor", stack.ingestor.clone()),
            ("refiner", stack.refiner.clone()),
            ("aggregator", stack.aggregator.clone()),
            ("coordinator", stack.coordinator.clone()),
        ] {
            wait_healthy(&endpoint, Duration::from_secs(30))
                .await
                .with_context(|| {
                    format!(
                        "{name} did not become healthy; see {}",
                        logs.join(format!("medallion-{name}.log")).display()
                    )
                })?;
        }
        Ok(stack)
    }

    /// Stops every service: SIGTERM, then SIGKILL after a grace period.
    pub async fn stop(mut self) {
        for (_, child) in &self.children {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .await;
            }
        }
        for (_, child) in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    /// Process ids of the services, by binary name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .filter_map(|(n, c)| Some((n.clone(), c.id()?)))
            .collect()
    }

    /// Returns when a service process exits on its own.
    pub async fn wait_any_exit(&mut self) -> String {
        loop {
            for (name, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    return format!("{name} exited with {status}");
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Polls the gRPC health service until it reports SERVING.
pub async fn wait_healthy(endpoint: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let channel = tonic::transport::Channel::from_shared(endpoint.to_string())?
                .connect()
                .await?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner()
                .status;
            anyhow::Ok(
                status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            )
        };
        if let Ok(true) = attempt.await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{endpoint} not healthy after {}s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn up(args: StackArgs) -> anyhow::Result<()> {
    let mut stack = Stack::start(&args).await?;
    println!("Medallion is up");
    println!("  coordinator  {}   (gRPC pipeline API)", stack.coordinator);
    println!("  ingestor     {}   (bronze Flight)", stack.ingestor);
    println!("  refiner      {}   (silver Flight)", stack.refiner);
    println!("  aggregator   {}   (gold Flight)", stack.aggregator);
    println!("  lake         {}", args.lake);
    println!("  logs         {}", stack.logs.display());
    println!("Press Ctrl-C to stop.");
    let exited = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        e = stack.wait_any_exit() => Some(e),
    };
    stack.stop().await;
    match exited {
        Some(e) => bail!("{e}; stack stopped"),
        None => Ok(()),
    }
}
