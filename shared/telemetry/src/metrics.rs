//! Prometheus metrics of one service process, served as text on `GET /metrics`.
//!
//! Every service registers the same families; each fills the ones its work touches (a layer
//! service its tasks, commits and Flight streams; the coordinator its runs).

use std::sync::OnceLock;

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A layer table.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub layer: String,
    pub table: String,
}

/// A finished task attempt: its layer and how it ended (`succeeded`, `skipped`, `failed`,
/// `cancelled`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub layer: String,
    pub outcome: String,
}

/// One expectation of a silver table.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpectationLabels {
    pub table: String,
    pub expectation: String,
    pub action: String,
}

/// A gold table and the warehouse table it loads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WarehouseLabels {
    pub table: String,
    pub target: String,
}

/// A finished pipeline run.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub pipeline: String,
    pub outcome: String,
}

type Seconds = Family<TaskLabels, Histogram>;

/// The metric families of a Medallion process.
pub struct Metrics {
    registry: Registry,
    /// Rows committed to a layer table.
    pub rows_written: Family<TableLabels, Counter>,
    /// Bytes (Parquet) committed to a layer table.
    pub bytes_written: Family<TableLabels, Counter>,
    /// Wall time of task attempts in a layer service, from start to manifest or error.
    pub task_seconds: Seconds,
    /// Rows that failed an expectation (whatever its action).
    pub expectation_failed_rows: Family<ExpectationLabels, Counter>,
    /// Arrow IPC bytes this service sent over Flight (its rate is Flight bytes/s).
    pub flight_sent_bytes: Family<TableLabels, Counter>,
    /// Arrow bytes this service received over Flight.
    pub flight_received_bytes: Family<TableLabels, Counter>,
    /// Wall time of warehouse loads.
    pub warehouse_load_seconds: Family<WarehouseLabels, Histogram>,
    /// Rows loaded into the warehouse.
    pub warehouse_rows: Family<WarehouseLabels, Counter>,
    /// Pipeline runs finished by the coordinator.
    pub runs: Family<RunLabels, Counter>,
}

fn seconds_histogram() -> Histogram {
    // 10 ms .. ~3 h: tasks range from no-op skips to large refreshes.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 2.5, 15,
    ))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("medallion");
        let rows_written = Family::default();
        registry.register(
            "rows_written",
            "Rows committed to a layer table",
            rows_written.clone(),
        );
        let bytes_written = Family::default();
        registry.register(
            "bytes_written",
            "Parquet bytes committed to a layer table",
            bytes_written.clone(),
        );
        let task_seconds = Seconds::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register(
            "task_duration_seconds",
            "Wall time of task attempts in a layer service",
            task_seconds.clone(),
        );
        let expectation_failed_rows = Family::default();
        registry.register(
            "expectation_failed_rows",
            "Rows that failed an expectation",
            expectation_failed_rows.clone(),
        );
        let flight_sent_bytes = Family::default();
        registry.register(
            "flight_sent_bytes",
            "Arrow IPC bytes sent over Flight",
            flight_sent_bytes.clone(),
        );
        let flight_received_bytes = Family::default();
        registry.register(
            "flight_received_bytes",
            "Arrow bytes received over Flight",
            flight_received_bytes.clone(),
        );
        let warehouse_load_seconds =
            Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register(
            "warehouse_load_seconds",
            "Wall time of warehouse loads",
            warehouse_load_seconds.clone(),
        );
        let warehouse_rows = Family::default();
        registry.register(
            "warehouse_rows",
            "Rows loaded into the warehouse",
            warehouse_rows.clone(),
        );
        let runs = Family::default();
        registry.register("runs", "Pipeline runs finished", runs.clone());
        Metrics {
            registry,
            rows_written,
            bytes_written,
            task_seconds,
            expectation_failed_rows,
            flight_sent_bytes,
            flight_received_bytes,
            warehouse_load_seconds,
            warehouse_rows,
            runs,
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Labels of a layer table.
pub fn table(layer: impl ToString, table: impl ToString) -> TableLabels {
    TableLabels {
        layer: layer.to_string(),
        table: table.to_string(),
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "serving Prometheus metrics on /metrics");
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        tokio::spawn(async move {
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                let response = if request.uri().path() == "/metrics" {
                    let mut response = Response::new(Full::new(Bytes::from(metrics().encode())));
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    response
                } else {
                    let mut response =
                        Response::new(Full::new(Bytes::from_static(b"not found: try /metrics\n")));
                    *response.status_mut() = StatusCode::NOT_FOUND;
                    response
                };
                Ok::<_, std::convert::Infallible>(response)
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
