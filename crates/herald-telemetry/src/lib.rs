//! Logging and tracing for every Herald process.
//!
//! One `tracing` subscriber per process: human-readable or JSON logs, plus an OpenTelemetry
//! layer so every span has W3C trace and span ids that travel in AMQP and HTTP headers. Spans
//! are exported over OTLP/HTTP when an endpoint is configured (`telemetry.otlp_endpoint`, or
//! the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and not
//! at all otherwise; `OTEL_SDK_DISABLED=true` turns export off, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_TRACES_SAMPLER(_ARG)` are honoured.

mod admin;

pub use admin::{ReadyCheck, metrics_handle, serve_admin, spawn_admin};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (development).
    #[default]
    Text,
    /// One JSON object per line (production).
    Json,
}

/// `[telemetry]` in herald.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// `tracing` filter directives; `RUST_LOG` wins when set.
    pub log_filter: String,
    /// OTLP/HTTP base URL (e.g. `http://jaeger:4318`); `/v1/traces` is appended. When unset,
    /// the standard `OTEL_EXPORTER_OTLP_*` variables decide; with neither, nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// Where the service serves `/metrics`, `/healthz` and `/readyz` (e.g. `0.0.0.0:9090`);
    /// unset: no admin listener.
    pub admin_listen: Option<String>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info,lapin=warn".into(),
            otlp_endpoint: None,
            admin_listen: None,
        }
    }
}

/// Keeps the tracer provider alive; dropping the first guard shuts tracing down (flushing
/// spans), so hold it for the life of the process.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every finished span now (tests; before a planned exit).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();

/// Installs the process-wide subscriber and the W3C propagator. A second call (several
/// services in one process, or many tests) leaves the first in place and returns an inert guard.
pub fn init(service: &str, settings: &TelemetrySettings) -> TelemetryGuard {
    if INSTALLED.set(()).is_err() {
        return TelemetryGuard { provider: None };
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    metrics_handle();
    let mut builder = SdkTracerProvider::builder().with_resource(resource(service));
    let export = export_endpoint(settings);
    if let Some(endpoint) = &export {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .build();
        match exporter {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            // Tracing is an aid, not a dependency: run on without export rather than fail.
            Err(error) => {
                eprintln!("herald-telemetry: OTLP export to {endpoint} disabled: {error}")
            }
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer(service.to_string());
    opentelemetry::global::set_tracer_provider(provider.clone());

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log_filter));
    let fmt = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(false).boxed(),
        LogFormat::Json => json_log_layer().boxed(),
    };
    // The log filter applies to log output only: spans must exist (and carry trace context
    // across hops) whatever the log level.
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .try_init();
    TelemetryGuard {
        provider: Some(provider),
    }
}

/// Production logs: one JSON object per line with the event's fields at the top level, the
/// current span, and `openTelemetry.traceId`/`spanId` so a log line leads to its trace.
fn json_log_layer<S>() -> json_subscriber::fmt::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    json_subscriber::fmt::layer()
        .flatten_event(true)
        .with_current_span(true)
        .with_opentelemetry_ids(true)
}

/// `service.name` from `OTEL_SERVICE_NAME` when set, else the binary's name; plus whatever
/// `OTEL_RESOURCE_ATTRIBUTES` adds.
fn resource(service: &str) -> opentelemetry_sdk::Resource {
    let builder = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name(service.to_string()).build()
    }
}

/// Where spans go: the configured endpoint, else the standard variables, else nowhere.
fn export_endpoint(settings: &TelemetrySettings) -> Option<String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return None;
    }
    let traces_url = |base: &str| format!("{}/v1/traces", base.trim_end_matches('/'));
    settings
        .otlp_endpoint
        .as_deref()
        .filter(|e| !e.trim().is_empty())
        .map(traces_url)
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|base| traces_url(&base)))
}

/// The W3C `traceparent` of the current span, if it has a valid context.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The span context a `traceparent` value names (to link to it), if valid.
pub fn span_context_of(traceparent: &str) -> Option<opentelemetry::trace::SpanContext> {
    let headers =
        std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context = opentelemetry::global::get_text_map_propagator(|p| p.extract(&headers));
    let sc = context.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The trace id of the current span, if any.
pub fn current_trace_id() -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The trace id inside a `traceparent` value.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let _version = parts.next()?;
    let trace_id = parts.next()?;
    (trace_id.len() == 32).then_some(trace_id)
}

/// Makes the W3C context in `headers` (lower-case names: `traceparent`, `tracestate`) the
/// parent of `span`; nothing happens when they carry no valid context.
pub fn set_parent_from_headers(
    span: &tracing::Span,
    headers: &std::collections::HashMap<String, String>,
) {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Makes a stored `traceparent` the parent of `span` (work resumed later, e.g. a callback
/// that continues the trace of the send it reports on).
pub fn set_parent_traceparent(span: &tracing::Span, traceparent: &str) {
    let headers =
        std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    set_parent_from_headers(span, &headers);
}

/// The current span's context as HTTP headers for an outbound call.
pub fn trace_headers() -> Vec<(String, String)> {
    struct Collect(Vec<(String, String)>);
    impl opentelemetry::propagation::Injector for Collect {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_string(), value));
        }
    }
    let context = tracing::Span::current().context();
    let mut collect = Collect(Vec::new());
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut collect));
    collect.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut buffer) = self.0.lock() {
                buffer.extend_from_slice(bytes);
            }
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_logs_carry_the_trace_and_span_ids_of_the_current_span() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(json_log_layer().with_writer(move || writer.clone()))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("send", herald.channel = "wechat.template");
            span.in_scope(|| {
                tracing::info!(code = 0, "sent");
                let context = tracing::Span::current().context();
                let sc = context.span().span_context().clone();
                (sc.trace_id().to_string(), sc.span_id().to_string())
            })
        });
        let bytes = buffer.0.lock().expect("buffer").clone();
        let line: serde_json::Value = serde_json::from_slice(&bytes).expect("one JSON line");
        assert_eq!(line["message"], "sent");
        assert_eq!(line["code"], 0);
        assert_eq!(line["span"]["name"], "send");
        assert_eq!(line["openTelemetry"]["traceId"], trace_id.as_str());
        assert_eq!(line["openTelemetry"]["spanId"], span_id.as_str());
    }

    #[test]
    fn spans_get_ids_and_a_stored_traceparent_continues_a_trace() {
        // Even with logs reduced to errors, spans keep their trace context.
        let settings = TelemetrySettings {
            log_filter: "error".into(),
            ..Default::default()
        };
        let _guard = init("test", &settings);
        let root = tracing::info_span!("root");
        let traceparent = root.in_scope(current_traceparent).expect("valid context");
        let trace_id = trace_id_of(&traceparent).expect("trace id").to_string();
        let later = tracing::info_span!("later");
        set_parent_traceparent(&later, &traceparent);
        assert_eq!(later.in_scope(current_trace_id), Some(trace_id));
        let headers = root.in_scope(trace_headers);
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "traceparent" && *v == traceparent)
        );
    }
}
