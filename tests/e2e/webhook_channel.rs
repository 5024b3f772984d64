//! The `webhook` channel through the whole stack: private targets are refused before any
//! connection unless allow-listed; delivered bodies carry Standard Webhooks signatures that an
//! independent implementation (the `standardwebhooks` package from PyPI) verifies, one per
//! secret while rotating; 410 fails without a retry, 503 retries with the same `webhook-id`,
//! and redirects are not followed.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::serve::ListenerExt;
use herald_contract::channels;
use herald_contract::v1::{DeliveryState, NotificationRequest, Recipient, TemplateRef};
use herald_e2e::{TestEnv, WAIT, demo};
use herald_sender::channels::webhook::WebhookAccountSettings;
use serde_json::{Value, json};

/// A second secret, as during a rotation.
const NEXT_SECRET: &str = "whsec_bmV4dC1zZWNyZXQtb2YtdGhlLWRlbW8td2ViaG9vaw==";

/// One request a receiver got: the status it answered, the headers and the body.
type Seen = (u16, axum::http::HeaderMap, Vec<u8>);

/// A webhook receiver on 127.0.0.1: answers `script` in order (status, `Location`), then 200;
/// counts the TCP connections it accepted.
struct Receiver {
    url: String,
    connections: Arc<AtomicUsize>,
    requests: tokio::sync::mpsc::UnboundedReceiver<Seen>,
}

async fn receiver(script: Vec<(u16, Option<String>)>) -> Receiver {
    use axum::routing::post;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let calls = Arc::new(AtomicUsize::new(0));
    let script = Arc::new(script);
    let app = axum::Router::new().route(
        "/hook",
        post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (tx, calls, script) = (tx.clone(), calls.clone(), script.clone());
                async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    let (status, location) = script.get(n).cloned().unwrap_or((200, None));
                    let _ = tx.send((status, headers, body.to_vec()));
                    let mut response = axum::http::Response::builder().status(status);
                    if let Some(location) = location {
                        response = response.header("location", location);
                    }
                    response
                        .body(axum::body::Body::from("receiver says no"))
                        .expect("response")
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let listener = listener.tap_io(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver {
        url,
        connections,
        requests: rx,
    }
}

/// A request for the demo template (or `template`) to webhook URLs.
fn request(template: &str, order: &str, urls: &[&str]) -> NotificationRequest {
    let mut request = demo::request(demo::OPENID, order);
    request.id = uuid::Uuid::now_v7().to_string();
    request.template = Some(TemplateRef {
        id: template.into(),
        ..Default::default()
    });
    request.channels = vec![channels::WEBHOOK.into()];
    request.recipients = urls
        .iter()
        .map(|url| Recipient {
            webhook_url: (*url).into(),
            ..Default::default()
        })
        .collect();
    request
}

async fn publish(env: &TestEnv, request: &NotificationRequest) {
    env.publish_request(&herald_contract::encode_json(request), Some("guest"), None)
        .await;
}

/// The `webhook_probe` template: a body with numbers of both kinds.
const PROBE_YAML: &str = r#"
id: webhook_probe
description: A webhook body with numbers.
variables:
  order_id: {type: string, required: true}
channels:
  webhook:
    body:
      event: order.shipped
      order: "{{ order_id }}"
      items: 2
      weight: 2.5
      codes: [2432232314, -1]
"#;

async fn create_probe_template(env: &TestEnv) {
    let response = env
        .http
        .post(format!("{}/v1/templates", env.stack.ingress_url))
        .bearer_auth(demo::API_KEY)
        .body(PROBE_YAML)
        .send()
        .await
        .expect("ingress answers");
    assert_eq!(response.status(), 201, "create webhook_probe");
    let response = env
        .http
        .post(format!(
            "{}/v1/templates/webhook_probe/publish",
            env.stack.ingress_url
        ))
        .bearer_auth(demo::API_KEY)
        .body(json!({"version": 1}).to_string())
        .send()
        .await
        .expect("ingress answers");
    assert_eq!(response.status(), 200, "publish webhook_probe");
}

/// Verifies a request with the `standardwebhooks` package (PyPI), installing it when missing:
/// an implementation that shares no code with Herald's.
fn verify_with_standardwebhooks(secret: &str, headers: &axum::http::HeaderMap, body: &[u8]) {
    let installed = Command::new("python3")
        .args(["-c", "import standardwebhooks"])
        .status()
        .expect("python3 runs");
    if !installed.success() {
        let pip = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "standardwebhooks"])
            .status()
            .expect("pip runs");
        assert!(pip.success(), "pip install standardwebhooks");
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{name} header"))
            .to_string()
    };
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
secret, msg_id, timestamp, signature = sys.argv[1:5]
body = sys.stdin.buffer.read()
Webhook(secret).verify(body, {"webhook-id": msg_id, "webhook-timestamp": timestamp,
                              "webhook-signature": signature})
print("verified")
"#;
    let mut child = Command::new("python3")
        .args([
            "-c",
            script,
            secret,
            &header("webhook-id"),
            &header("webhook-timestamp"),
            &header("webhook-signature"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(body).expect("body to python");
    }
    let output = child.wait_with_output().expect("python3 ends");
    assert!(
        output.status.success(),
        "standardwebhooks refuses the signature with {secret:.10}…: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn header(headers: &axum::http::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn next_request(receiver: &mut Receiver) -> Seen {
    tokio::time::timeout(WAIT, receiver.requests.recv())
        .await
        .expect("a request within the wait")
        .expect("receiver open")
}

/// The delivery of a single-recipient message, from the status API.
async fn delivery(env: &TestEnv, message: &str) -> Value {
    let view = env.get_message(message).await;
    view["deliveries"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_before_any_connection_without_an_allow_list() {
    // The demo account as seeded: a secret, no allow-list.
    let mut env = TestEnv::start().await;
    let mut hook = receiver(Vec::new()).await;
    let by_name = hook.url.replace("127.0.0.1", "localhost");
    let literal = request(demo::TEMPLATE, "SSRF-1", &[hook.url.as_str()]);
    let named = request(demo::TEMPLATE, "SSRF-2", &[by_name.as_str()]);
    publish(&env, &literal).await;
    publish(&env, &named).await;
    let failed = env
        .wait_for_statuses(
            &[literal.id.clone(), named.id.clone()],
            DeliveryState::Failed,
            WAIT,
        )
        .await;
    for event in &failed {
        // The literal is checked before the request, the name by the resolver at connect time.
        assert_eq!(event.error_code, "ssrf_refused", "{event:?}");
        assert!(
            event.error_message.contains("not a public address"),
            "{event:?}"
        );
    }
    for id in [&literal.id, &named.id] {
        let delivery = delivery(&env, id).await;
        assert_eq!(delivery["state"], "failed");
        assert_eq!(delivery["attempts"], 1, "never retried: {delivery}");
    }
    assert_eq!(
        hook.connections.load(Ordering::SeqCst),
        0,
        "no connection reached the receiver"
    );
    assert!(hook.requests.try_recv().is_err());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_listed_targets_get_signed_bodies_and_answers_are_classified() {
    let mut env = TestEnv::start_with(|config| {
        config.sender.webhooks.insert(
            demo::WEBHOOK_ACCOUNT.into(),
            WebhookAccountSettings {
                // Rotating: the old and the new secret at once.
                secrets: vec![demo::WEBHOOK_SECRET.into(), NEXT_SECRET.into()],
                allow: vec!["127.0.0.1/32".into()],
                ..Default::default()
            },
        );
    })
    .await;
    create_probe_template(&env).await;

    // Delivered, signed with both secrets, the body as the template wrote it.
    let mut ok = receiver(Vec::new()).await;
    let sent = request("webhook_probe", "WH-1", &[ok.url.as_str()]);
    publish(&env, &sent).await;
    env.wait_for_status(&sent.id, DeliveryState::Sent).await;
    let (_, headers, body) = next_request(&mut ok).await;
    let body_json: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(
        body_json,
        json!({"event": "order.shipped", "order": "WH-1", "items": 2, "weight": 2.5,
               "codes": [2432232314_i64, -1]})
    );
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains(r#""items":2,"#) && text.contains("2432232314,") && !text.contains("2.0"),
        "whole numbers are integers: {text}"
    );
    assert_eq!(header(&headers, "content-type"), "application/json");
    assert_eq!(
        header(&headers, "webhook-signature").split(' ').count(),
        2,
        "one signature per secret"
    );
    verify_with_standardwebhooks(demo::WEBHOOK_SECRET, &headers, &body);
    verify_with_standardwebhooks(NEXT_SECRET, &headers, &body);
    let webhook_id = header(&headers, "webhook-id");
    assert!(webhook_id.starts_with("msg_"), "{webhook_id}");
    let view = delivery(&env, &sent.id).await;
    assert_eq!(view["state"], "sent");
    assert_eq!(view["provider_msgid"], webhook_id.as_str());

    // 410 Gone and a redirect fail at once; the redirect's target is never called although
    // it is allow-listed too.
    let mut gone = receiver(vec![(410, None)]).await;
    let elsewhere = receiver(Vec::new()).await;
    let mut moved = receiver(vec![(302, Some(elsewhere.url.clone()))]).await;
    let gone_request = request("webhook_probe", "WH-2", &[gone.url.as_str()]);
    let moved_request = request("webhook_probe", "WH-3", &[moved.url.as_str()]);
    publish(&env, &gone_request).await;
    publish(&env, &moved_request).await;
    let failed = env
        .wait_for_statuses(
            &[gone_request.id.clone(), moved_request.id.clone()],
            DeliveryState::Failed,
            WAIT,
        )
        .await;
    let code_of = |id: &str| {
        failed
            .iter()
            .find(|e| e.message_id == id)
            .map(|e| e.error_code.clone())
    };
    assert_eq!(code_of(&gone_request.id).as_deref(), Some("http_410"));
    assert_eq!(code_of(&moved_request.id).as_deref(), Some("http_302"));
    assert_eq!(next_request(&mut gone).await.0, 410);
    assert_eq!(next_request(&mut moved).await.0, 302);

    // 503 twice, then 200: sent on the third call, with the same webhook-id every time. It
    // takes two retry tiers, by which time a retry of the 410 would have arrived too.
    let mut flaky = receiver(vec![(503, None), (503, None)]).await;
    let retried = request("webhook_probe", "WH-4", &[flaky.url.as_str()]);
    publish(&env, &retried).await;
    env.wait_for_status(&retried.id, DeliveryState::Sent).await;
    let mut calls = Vec::new();
    for _ in 0..3 {
        let (status, headers, body) = next_request(&mut flaky).await;
        verify_with_standardwebhooks(demo::WEBHOOK_SECRET, &headers, &body);
        calls.push((status, header(&headers, "webhook-id")));
    }
    assert_eq!(
        calls.iter().map(|c| c.0).collect::<Vec<_>>(),
        [503, 503, 200]
    );
    assert!(
        calls.iter().all(|c| c.1 == calls[0].1),
        "one webhook-id for every attempt: {calls:?}"
    );
    let view = delivery(&env, &retried.id).await;
    assert_eq!(view["attempts"], 3, "{view}");
    assert_eq!(view["provider_msgid"], calls[0].1.as_str());

    // No retries of the permanent failures, and the redirect was not followed.
    assert!(gone.requests.try_recv().is_err(), "410 is not retried");
    assert!(
        moved.requests.try_recv().is_err(),
        "a redirect is not retried"
    );
    assert_eq!(delivery(&env, &gone_request.id).await["attempts"], 1);
    assert_eq!(
        elsewhere.connections.load(Ordering::SeqCst),
        0,
        "the redirect's target was never called"
    );
    env.stop().await;
}
