//! Logs and traces of the server and the agent: a `RUST_LOG`-style filter, text or JSON log
//! lines, and, only when an OTLP endpoint is configured, spans exported over OTLP/gRPC. With
//! no endpoint the OpenTelemetry layer is not installed at all, so tracing costs what plain
//! logging costs.
//!
//! One trace follows a commit from the webhook to the applied objects and back to its
//! commit status, across processes that never share a call stack: the trace context travels
//! as a W3C `traceparent` value in the change log, in revision headers and in report
//! metadata, and [`traceparent`] / [`adopt`] convert between it and a span.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The standard variable naming the OTLP endpoint when the configuration does not.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The W3C header (and metadata key) carrying a trace context.
pub const TRACEPARENT: &str = "traceparent";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the fields of every enclosing span.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = TelemetryError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(TelemetryError::LogFormat(other.to_owned())),
        }
    }
}

/// Why logging or tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log format `{0}` is not one of: text, json")]
    LogFormat(String),
    #[error("cannot export traces to {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("a global log subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// What [`init`] sets up.
#[derive(Debug, Clone, Default)]
pub struct TelemetrySettings {
    /// `service.name` of exported spans.
    pub service: &'static str,
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint (`http://collector:4317`); none exports nothing.
    pub otlp_endpoint: Option<String>,
}

/// Keeps exporting until dropped; dropping it flushes the spans not yet sent.
#[must_use = "dropping it stops exporting traces"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends every finished span now.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the process-wide log subscriber, with the filter from `RUST_LOG` (default
/// `info`), and the OTLP exporter when an endpoint is set. Must run inside a Tokio runtime
/// when exporting: the gRPC exporter's connection lives on it.
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    };
    let (otel, provider) = match &settings.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let provider = provider(settings.service, endpoint)?;
            let tracer = provider.tracer(settings.service);
            let layer = tracing_opentelemetry::layer().with_tracer(tracer);
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(Telemetry { provider })
}

/// [`init`] for a binary that builds its own `runtime`: the exporter's connection is made
/// on it.
pub fn init_on(
    runtime: &tokio::runtime::Runtime,
    settings: &TelemetrySettings,
) -> Result<Telemetry, TelemetryError> {
    let _runtime = runtime.enter();
    init(settings)
}

/// A tracer provider exporting to `endpoint` in batches.
fn provider(service: &'static str, endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The endpoint from configuration, else from [`OTLP_ENDPOINT_ENV`]; empty means none.
pub fn endpoint_from(configured: Option<String>) -> Option<String> {
    configured
        .or_else(|| std::env::var(OTLP_ENDPOINT_ENV).ok())
        .filter(|endpoint| !endpoint.trim().is_empty())
}

/// The W3C `traceparent` of `span`, if it is being traced.
pub fn traceparent(span: &Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the trace `traceparent` names, and records its trace id in the
/// span's `trace_id` field (declared empty where the span is made) so that log lines carry
/// it. A missing or malformed value leaves the span a root of its own.
pub fn adopt(span: &Span, traceparent: Option<&str>) {
    if let Some(value) = traceparent.filter(|v| !v.is_empty()) {
        let carrier = HashMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    record_trace_id(span);
}

/// Records the trace id of `span` in its `trace_id` field, when it is being traced.
pub fn record_trace_id(span: &Span) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_refuse_others_by_name() {
        assert_eq!("text".parse::<LogFormat>().ok(), Some(LogFormat::Text));
        assert_eq!("json".parse::<LogFormat>().ok(), Some(LogFormat::Json));
        let error = "xml".parse::<LogFormat>().unwrap_err().to_string();
        assert_eq!(error, "log format `xml` is not one of: text, json");
    }

    #[test]
    fn an_untraced_span_has_no_traceparent_and_adopting_garbage_is_harmless() {
        let span = tracing::info_span!("untraced", trace_id = tracing::field::Empty);
        assert_eq!(traceparent(&span), None);
        adopt(&span, Some("not a traceparent"));
        adopt(&span, None);
        assert_eq!(traceparent(&span), None);
    }

    #[test]
    fn an_empty_endpoint_is_no_endpoint() {
        assert_eq!(endpoint_from(Some(" ".to_owned())), None);
        assert_eq!(
            endpoint_from(Some("http://collector:4317".to_owned())).as_deref(),
            Some("http://collector:4317")
        );
    }
}
