//! Bootstrap every Medallion service shares: one `serve()` that adds gRPC health and
//! reflection to a service's routes, tuned HTTP/2 windows for Arrow Flight, TLS, a span per
//! call and a Prometheus endpoint; channels to other services; shutdown on SIGINT/SIGTERM
//! through a cancellation token; and the runtime a service's `main` runs on, with malloc's
//! arenas bounded ([`memory`]).

mod discovery;
pub mod memory;
mod tls;

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
pub use tokio_util::sync::CancellationToken;
use tonic::{service::Routes, transport::Endpoint};

pub use discovery::REPLICA_WAIT;
pub use tls::{TlsOptions, install_crypto_provider};

/// HTTP/2 stream and connection window: the lever for Flight throughput on one host (STACK.md).
pub const FLIGHT_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC reflection set-up failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot read the TLS {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("mutual TLS needs a CA bundle (--tls-ca) to check client certificates against")]
    TlsClientAuthWithoutCa,
    #[error("invalid service URL `{url}`: {reason}")]
    Url { url: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Options every service process has: its metrics endpoint and TLS.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServiceOptions {
    /// Address to serve Prometheus metrics on (`GET /metrics`), e.g. `0.0.0.0:9464`. Off
    /// when unset.
    #[arg(long, env = "MEDALLION_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub tls: TlsOptions,
}

pub use discovery::{Replicas, channel, channel_and_replicas};

/// The HTTP/2 settings every client endpoint gets.
fn configure(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(FLIGHT_WINDOW_BYTES)
        .initial_connection_window_size(FLIGHT_WINDOW_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(30))
}

/// One endpoint at `url` (no balancing), for a client that connects once, such as the CLI.
pub fn endpoint(url: &str, tls: &TlsOptions) -> Result<Endpoint> {
    let bad = |reason: String| Error::Url {
        url: url.to_string(),
        reason,
    };
    let mut endpoint =
        configure(Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?);
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(tls.client_config()?)
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(endpoint)
}

/// Binds a listener; port 0 picks a free port.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind {
        addr: addr.to_string(),
        source,
    })
}

/// Serves `routes` plus health and reflection until `shutdown` is cancelled, then drains.
///
/// `service_names` are the fully qualified gRPC services reported SERVING by the health service
/// once the listener accepts; the empty name (whole server) is always reported.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&str],
    options: &ServiceOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    if let Some(addr) = &options.metrics_listen {
        let metrics = bind(addr).await?;
        tokio::spawn(medallion_telemetry::metrics::serve(
            metrics,
            shutdown.clone(),
        ));
    }
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in service_names {
        reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    // Both reflection versions: many clients (grpcurl, Python's grpcio-reflection) still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(medallion_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let tls = options.tls.server_config()?;
    tracing::info!(
        ?addr,
        tls = tls.is_some(),
        mutual_tls = options.tls.tls_client_auth,
        "serving gRPC"
    );
    let stopping = shutdown.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .trace_fn(medallion_telemetry::server_span)
        .initial_stream_window_size(FLIGHT_WINDOW_BYTES)
        .initial_connection_window_size(FLIGHT_WINDOW_BYTES)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(routes)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            stopping.cancelled().await;
            // Readiness goes first so balancers stop sending new work while we drain.
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        })
        .await?;
    tracing::info!(?addr, "stopped");
    Ok(())
}

/// A token cancelled on SIGINT or SIGTERM: the root of a service's shutdown tree.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("cannot listen for SIGTERM: {e}");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}
