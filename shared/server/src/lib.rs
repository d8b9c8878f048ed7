//! Bootstrap every Medallion service shares: one `serve()` that adds gRPC health and
//! reflection to a service's routes, tuned HTTP/2 windows for Arrow Flight, logging set-up,
//! and shutdown on SIGINT/SIGTERM through a cancellation token.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
pub use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
    shutdown: CancellationToken,
) -> Result<()> {
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
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "serving gRPC");
    let stopping = shutdown.clone();
    tonic::transport::Server::builder()
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

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: logs redirected to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
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
