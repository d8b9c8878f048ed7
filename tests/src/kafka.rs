//! A Kafka-compatible broker for the CDC tests: tansu with its SQLite storage engine, on
//! loopback, in a temporary folder (tests/run.sh installs it; `MEDALLION_TANSU` names the
//! binary, else `tansu` on PATH). Plus a producer for Debezium events.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::process::{Child, Command};

use crate::free_port;

/// A tansu broker process; killed on drop, its data removed with its folder.
pub struct Broker {
    pub bootstrap: String,
    producer: FutureProducer,
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Broker {
    pub async fn start() -> anyhow::Result<Broker> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let child = Self::spawn(&dir, port).await?;
        let bootstrap = format!("127.0.0.1:{port}");
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("message.timeout.ms", "30000")
            .create()
            .context("Kafka producer")?;
        Ok(Broker {
            bootstrap,
            producer,
            dir,
            port,
            child,
        })
    }

    /// Kills the broker process (SIGKILL) and starts it again on the same port and data.
    pub async fn restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.child.kill().await?;
        tokio::time::sleep(down_for).await;
        self.child = Self::spawn(&self.dir, self.port).await?;
        Ok(())
    }

    async fn spawn(dir: &tempfile::TempDir, port: u16) -> anyhow::Result<Child> {
        let binary = std::env::var("MEDALLION_TANSU").unwrap_or_else(|_| "tansu".into());
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("tansu.log"))?;
        // The SQLite path is relative to the working directory, so run it in the folder.
        let child = Command::new(&binary)
            .current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("starting the tansu broker ({binary}); tests/run.sh installs it")
            })?;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(child)
    }

    /// What the broker logged so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()?;
        let results = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?;
        for result in results {
            result.map_err(|(topic, code)| anyhow::anyhow!("creating topic {topic}: {code}"))?;
        }
        Ok(())
    }

    /// Sends one message to `partition`; `value: None` is a tombstone.
    pub async fn send(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        value: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut record = FutureRecord::<str, str>::to(topic)
            .partition(partition)
            .key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}/{partition}: {e}"))?;
        Ok(())
    }
}
