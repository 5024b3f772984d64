//! W3C trace context over AMQP headers.
//!
//! No crate propagates OpenTelemetry context over lapin's `FieldTable`, so this is the
//! Injector/Extractor pair, used with whatever global propagator telemetry installed.

use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0
            .insert(key.to_string().into(), AMQPValue::LongString(value.into()));
    }
}

struct HeaderExtractor<'a>(Option<&'a FieldTable>);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        crate::header_str(self.0, key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .map(|t| t.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default()
    }
}

/// Writes the current span's context (`traceparent`, `tracestate`) into `headers`.
pub fn inject_current(headers: &mut FieldTable) {
    inject_span(&tracing::Span::current(), headers);
}

/// Writes `span`'s context into `headers`.
pub fn inject_span(span: &tracing::Span, headers: &mut FieldTable) {
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}

/// Makes the context carried by `headers` (if any) the parent of `span`.
pub fn set_parent_from(span: &tracing::Span, headers: Option<&FieldTable>) {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    // A span that already started keeps its own trace if the headers carry none.
    if opentelemetry::trace::TraceContextExt::span(&parent)
        .span_context()
        .is_valid()
    {
        let _ = span.set_parent(parent);
    }
}

/// The span of processing one consumed message: OTel messaging attributes, the Herald fields
/// any stage may record, and the producer's context (from the headers) as parent.
pub fn consumer_span(queue: &str, delivery: &lapin::message::Delivery) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("{queue} process"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation = "process",
        messaging.destination.name = %delivery.exchange,
        messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
        messaging.message.id = tracing::field::Empty,
        herald.tenant = tracing::field::Empty,
        herald.message_id = tracing::field::Empty,
        herald.delivery_id = tracing::field::Empty,
        herald.channel = tracing::field::Empty,
        herald.attempt = tracing::field::Empty,
        herald.provider_msgid = tracing::field::Empty,
        herald.provider.errcode = tracing::field::Empty,
        herald.state = tracing::field::Empty,
    );
    if let Some(id) = delivery.properties.message_id() {
        span.record("messaging.message.id", id.as_str());
    }
    set_parent_from(&span, delivery.properties.headers().as_ref());
    let retry_of = crate::header_str(
        delivery.properties.headers().as_ref(),
        herald_contract::headers::RETRY_OF,
    );
    if let Some(previous) = retry_of.and_then(herald_telemetry::span_context_of) {
        span.add_link(previous);
    }
    span
}
