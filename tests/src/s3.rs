//! Real servers for the cloud tests, on loopback: an S3-compatible server (moto's standalone
//! server, from the Python environment tests/run.sh installs, started through
//! tests/python/s3_server.py) and the local Redshift Data API endpoint (the
//! `redshift-data-local` binary of this crate, backed by the test PostgreSQL).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use tokio::process::{Child, Command};

use crate::{bin_dir, free_port, postgres_url};

/// Credentials the test servers accept (moto checks none; the services still sign with them).
pub const ACCESS_KEY: &str = "medallion-test";
pub const SECRET_KEY: &str = "medallion-test-secret";
pub const REGION: &str = "us-east-1";

/// A moto S3 server process; killed on drop.
pub struct S3Server {
    pub endpoint: String,
    client: aws_sdk_s3::Client,
    _child: Child,
}

impl S3Server {
    /// Starts moto on a free port and waits until it answers.
    pub async fn start() -> anyhow::Result<S3Server> {
        S3Server::spawn(None).await
    }

    /// Like [`S3Server::start`], but checking credentials (against moto's empty IAM, so every
    /// key is unknown) once `free_requests` requests have been served, readiness probe included.
    pub async fn start_checking_credentials_after(free_requests: u32) -> anyhow::Result<S3Server> {
        S3Server::spawn(Some(free_requests)).await
    }

    async fn spawn(free_requests: Option<u32>) -> anyhow::Result<S3Server> {
        let python = std::env::var("MEDALLION_TEST_PYTHON").context(
            "MEDALLION_TEST_PYTHON is not set (tests/run.sh sets it after installing moto)",
        )?;
        let port = free_port();
        let mut command = Command::new(python);
        if let Some(n) = free_requests {
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        // moto's server behind a launcher that makes conditional writes atomic, as on S3.
        let launcher = concat!(env!("CARGO_MANIFEST_DIR"), "/python/s3_server.py");
        let child = command
            .args([launcher, "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting moto's S3 server")?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
            .endpoint_url(&endpoint)
            .force_path_style(true)
            .build();
        let server = S3Server {
            endpoint,
            client: aws_sdk_s3::Client::from_conf(config),
            _child: child,
        };
        for _ in 0..300 {
            if server.client.list_buckets().send().await.is_ok() {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("moto's S3 server did not come up on {}", server.endpoint)
    }

    /// The test's own S3 client (static test credentials).
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// Environment that points a Medallion service (or the Redshift endpoint) at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("MEDALLION_S3_ENDPOINT", self.endpoint.as_str()),
            ("MEDALLION_S3_PATH_STYLE", "true"),
            ("MEDALLION_S3_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Delta storage options with the test credentials, for reading the lake from the test.
    pub fn storage_options(&self) -> std::collections::HashMap<String, String> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub async fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        self.client
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .with_context(|| format!("creating bucket {bucket}"))?;
        Ok(())
    }

    pub async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .with_context(|| format!("writing s3://{bucket}/{key}"))?;
        Ok(())
    }

    pub async fn put_file(&self, bucket: &str, key: &str, path: &Path) -> anyhow::Result<()> {
        self.put(bucket, key, std::fs::read(path)?).await
    }

    /// Keys under `prefix`, sorted.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            keys.extend(
                page?
                    .contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
        }
        keys.sort();
        Ok(keys)
    }
}

/// The `redshift-data-local` endpoint process, backed by the test PostgreSQL and `s3`.
pub struct RedshiftDataLocal {
    pub endpoint: String,
    _child: Child,
}

impl RedshiftDataLocal {
    pub async fn start(s3: &S3Server, log: &Path) -> anyhow::Result<RedshiftDataLocal> {
        let port = free_port();
        let log = std::fs::File::create(log)?;
        let child = Command::new(bin_dir().join("redshift-data-local"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--postgres",
                &postgres_url(),
            ])
            .envs(s3.env())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context(
                "starting redshift-data-local (build it with `cargo build --workspace --bins`)",
            )?;
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(RedshiftDataLocal {
                    endpoint: format!("http://127.0.0.1:{port}"),
                    _child: child,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("redshift-data-local did not come up on port {port}")
    }
}
