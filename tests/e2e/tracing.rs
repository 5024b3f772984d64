//! One notification, one trace: an in-process OTLP/HTTP receiver (what Jaeger's 4318 port
//! speaks) collects the spans every service exports while a request travels the whole stack.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use herald_contract::v1::DeliveryState;
use herald_e2e::{TestEnv, demo, new_traceparent};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

type Collected = Arc<Mutex<Vec<Span>>>;

/// One OTLP receiver for the whole test binary (the exporter is process-wide), on a thread of
/// its own so it outlives each test's runtime.
fn otlp_receiver() -> &'static (String, Collected) {
    static RECEIVER: OnceLock<(String, Collected)> = OnceLock::new();
    RECEIVER.get_or_init(|| {
        let collected: Collected = Arc::default();
        let sink = collected.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("receiver runtime");
            runtime.block_on(async move {
                let app = axum::Router::new().route(
                    "/v1/traces",
                    axum::routing::post(move |body: Bytes| {
                        let sink = sink.clone();
                        async move {
                            let request =
                                ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                            let spans = request
                                .resource_spans
                                .into_iter()
                                .flat_map(|r| r.scope_spans)
                                .flat_map(|s| s.spans);
                            sink.lock().expect("collector").extend(spans);
                            axum::http::StatusCode::OK
                        }
                    }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app).await;
            });
        });
        herald_e2e::init_telemetry(Some(format!("http://{address}")));
        (format!("http://{address}"), collected)
    })
}

/// The spans of `trace_id` collected so far, flushing until `done` holds for them.
async fn trace_spans(trace_id: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let (_, collected) = otlp_receiver();
    let mut spans = Vec::new();
    for _ in 0..50 {
        herald_e2e::flush_telemetry();
        spans = collected
            .lock()
            .expect("collector")
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .cloned()
            .collect::<Vec<_>>();
        if done(&spans) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    spans
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            AnyValue::IntValue(i) => Some(i.to_string()),
            AnyValue::BoolValue(b) => Some(b.to_string()),
            _ => None,
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_notification_is_one_trace_across_every_service() {
    otlp_receiver();
    let mut env = TestEnv::start().await;
    let prefix = env.stack.config.amqp.prefix.clone();
    let (traceparent, trace_id) = new_traceparent();
    let producer_span = traceparent.split('-').nth(2).expect("span id").to_string();

    let message_id = uuid::Uuid::now_v7().to_string();
    let mut request = demo::request(demo::OPENID, "TR-1");
    request.id = message_id.clone();
    env.publish_request(
        &herald_contract::encode_json(&request),
        Some("guest"),
        Some(&traceparent),
    )
    .await;
    env.wait_for_status(&message_id, DeliveryState::Delivered)
        .await;

    // The projector's span ends just before its status event is relayed; flush until it is in.
    let projector = format!("{prefix}.projector process");
    let spans = trace_spans(&trace_id, |spans| spans.iter().any(|s| s.name == projector)).await;
    let named = |name: &str| -> Span {
        spans
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_else(|| {
                let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
                panic!("no span `{name}` in the trace; have {names:?}")
            })
    };
    let render = named(&format!("{prefix}.render process"));
    let publish_job = named(&format!("{prefix}.deliveries publish"));
    let send = named(&format!("{prefix}.send.wechat.template process"));
    let provider = named("POST /cgi-bin/message/template/send");
    let callback = named("POST /v1/callbacks/wechat/{account}");
    let publish_event = named(&format!("{prefix}.events publish"));
    let project = named(&projector);

    // The producer's context is what Herald continues (the harness publishes through Herald's
    // own publisher, which adds its producer span under the given traceparent).
    let publish_request = named(&format!("{prefix}.requests publish"));
    assert_eq!(hex(&publish_request.parent_span_id), producer_span);
    assert_eq!(render.parent_span_id, publish_request.span_id);
    // render → publish the job → send → the provider call.
    assert_eq!(publish_job.parent_span_id, render.span_id);
    assert_eq!(send.parent_span_id, publish_job.span_id);
    assert_eq!(
        provider.parent_span_id, send.span_id,
        "the provider HTTP span is a child of the send"
    );
    // The callback continues the trace stored with its delivery; the projection continues the callback.
    assert_eq!(publish_event.parent_span_id, callback.span_id);
    assert_eq!(project.parent_span_id, publish_event.span_id);

    for (span, kind) in [
        (&render, SpanKind::Consumer),
        (&publish_job, SpanKind::Producer),
        (&send, SpanKind::Consumer),
        (&provider, SpanKind::Client),
        (&callback, SpanKind::Server),
        (&project, SpanKind::Consumer),
    ] {
        assert_eq!(span.kind, kind as i32, "kind of {}", span.name);
    }
    assert_eq!(
        attribute(&send, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(
        attribute(&send, "messaging.operation").as_deref(),
        Some("process")
    );
    assert_eq!(
        attribute(&send, "herald.channel").as_deref(),
        Some("wechat.template")
    );
    assert_eq!(
        attribute(&send, "herald.tenant").as_deref(),
        Some(demo::TENANT)
    );
    assert_eq!(
        attribute(&send, "herald.provider.errcode").as_deref(),
        Some("0")
    );
    assert_eq!(
        attribute(&render, "herald.message_id").as_deref(),
        Some(message_id.as_str())
    );
    assert_eq!(
        attribute(&provider, "http.request.method").as_deref(),
        Some("POST")
    );
    assert_eq!(
        attribute(&publish_job, "messaging.rabbitmq.destination.routing_key").as_deref(),
        Some("wechat.template")
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_stays_in_the_trace_and_links_to_the_failed_attempt() {
    otlp_receiver();
    let mut env = TestEnv::start().await;
    let prefix = env.stack.config.amqp.prefix.clone();
    // The first call fails with HTTP 500 (a transport-class failure): one retry through a tier.
    env.stack.sandbox.inject_faults(
        herald_sandbox::paths::TEMPLATE_SEND,
        vec![herald_sandbox::Fault::Status { status: 500 }],
    );
    let (traceparent, trace_id) = new_traceparent();
    let message_id = uuid::Uuid::now_v7().to_string();
    let mut request = demo::request(demo::OPENID, "TR-RETRY");
    request.id = message_id.clone();
    env.publish_request(
        &herald_contract::encode_json(&request),
        Some("guest"),
        Some(&traceparent),
    )
    .await;
    env.wait_for_status(&message_id, DeliveryState::Sent).await;

    let send = format!("{prefix}.send.wechat.template process");
    let spans = trace_spans(&trace_id, |spans| {
        spans.iter().filter(|s| s.name == send).count() == 2
    })
    .await;
    let mut attempts: Vec<&Span> = spans.iter().filter(|s| s.name == send).collect();
    assert_eq!(attempts.len(), 2, "two attempts in the one trace");
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(attribute(first, "herald.attempt").as_deref(), Some("1"));
    assert_eq!(attribute(second, "herald.attempt").as_deref(), Some("2"));
    assert!(
        second
            .links
            .iter()
            .any(|l| l.span_id == first.span_id && l.trace_id == first.trace_id),
        "the retry links to the failed attempt: {:?}",
        second.links
    );
    // It is also its descendant: failed attempt → retry publish → next attempt.
    let retry_publish = spans
        .iter()
        .find(|s| s.name == format!("{prefix}.retry publish"))
        .expect("retry publish span");
    assert_eq!(retry_publish.parent_span_id, first.span_id);
    assert_eq!(second.parent_span_id, retry_publish.span_id);
    env.stop().await;
}
