//! Observability every Medallion service shares: logs, OpenTelemetry traces exported over
//! OTLP/gRPC when the standard `OTEL_*` variables ask for it, W3C trace context carried in gRPC
//! metadata (and so in Flight headers), and Prometheus metrics served on `/metrics`.

pub mod metrics;
mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{
    Resource,
    trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
};
use tracing_subscriber::{EnvFilter, Layer as _, layer::SubscriberExt, util::SubscriberInitExt};

pub use propagation::{inject_context, server_span};

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter. Call it after the service stopped serving.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The provider's shutdown blocks until the exporter has flushed.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Whether the standard variables ask for OTLP trace export: an endpoint is set, the SDK is
/// not disabled and the traces exporter is not `none`.
fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Sets up logging to stderr (filtered by `RUST_LOG`, default `warn,medallion=info`) and, when an OTLP
/// endpoint is configured through the standard `OTEL_*` variables, span export over OTLP/gRPC
/// with `service` as the service name unless `OTEL_SERVICE_NAME` says otherwise. Sampling
/// follows `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`, batching `OTEL_BSP_*`.
///
/// Must run inside the Tokio runtime: the exporter sends from it.
pub fn init(service: &'static str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    // By default Medallion's own logs at info, the libraries' (Delta log reads, HTTP/2) only
    // when they warn.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,medallion=info"));
    // Colour only on a terminal: logs redirected to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let mut export_error = None;
    let provider = if otlp_requested() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                let mut resource = Resource::builder();
                if std::env::var("OTEL_SERVICE_NAME").is_err() {
                    resource = resource.with_service_name(service);
                }
                // Exports from the service's own runtime (the default processor's thread has
                // no Tokio reactor for the gRPC exporter).
                let processor =
                    BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
                        .build();
                Some(
                    SdkTracerProvider::builder()
                        .with_span_processor(processor)
                        .with_resource(resource.build())
                        .build(),
                )
            }
            Err(e) => {
                export_error = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    // Only Medallion's own spans become trace spans: the libraries' internal spans (Delta log
    // reads, object store calls) would bury the run's shape and start traces of their own.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("medallion"))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target().starts_with("medallion")
            }))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    if let Some(e) = export_error {
        tracing::warn!("OTLP trace export is configured but cannot start: {e}");
    } else if provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry { provider }
}
