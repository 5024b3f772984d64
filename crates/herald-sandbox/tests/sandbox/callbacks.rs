use std::time::Duration;

use axum::http::StatusCode;
use herald_sandbox::SandboxConfig;
use serde::Deserialize;
use serde_json::json;
use sha1::{Digest, Sha1};
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "ToUserName")]
    to_user_name: String,
    #[serde(rename = "FromUserName")]
    from_user_name: String,
    #[serde(rename = "CreateTime")]
    create_time: i64,
    #[serde(rename = "MsgType")]
    msg_type: String,
    #[serde(rename = "Event")]
    event: String,
    #[serde(rename = "MsgID")]
    msg_id: u64,
    #[serde(rename = "Status")]
    status: String,
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    timeout(WAIT, rx.recv())
        .await
        .expect("callback in time")
        .expect("receiver alive")
}

fn verify_signature(received: &Received) {
    let q = &received.query;
    let mut parts = [CALLBACK_TOKEN, q["timestamp"].as_str(), q["nonce"].as_str()];
    parts.sort();
    let expected = hex::encode(Sha1::digest(parts.concat().as_bytes()));
    assert_eq!(q["signature"], expected);
}

#[tokio::test]
async fn a_send_triggers_a_signed_templatesendjobfinish_callback() {
    let (url, mut rx) = receiver(StatusCode::OK, "success").await;
    let sb = start(config()).await;
    sb.sandbox.set_callback_url(APPID, Some(url.clone()));
    let token = sb.token().await;
    let msgid = sb.send(&token, &message(OPENID)).await["msgid"]
        .as_u64()
        .expect("msgid");

    let received = next(&mut rx).await;
    verify_signature(&received);
    assert_eq!(received.query["openid"], OPENID);
    assert_eq!(received.content_type.as_deref(), Some("text/xml"));
    let event: Event = quick_xml::de::from_str(&received.body).expect("xml");
    assert_eq!(event.to_user_name, "gh_demo00000001");
    assert_eq!(event.from_user_name, OPENID);
    assert_eq!(event.msg_type, "event");
    assert_eq!(event.event, "TEMPLATESENDJOBFINISH");
    assert_eq!(event.msg_id, msgid);
    assert_eq!(event.status, "success");
    assert!((event.create_time - chrono::Utc::now().timestamp()).abs() < 60);

    let attempts = sb.sandbox.wait_for_callbacks(1, WAIT).await;
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].msgid, msgid);
    assert_eq!(attempts[0].attempt, 1);
    assert_eq!(attempts[0].status, Some(200));
    assert!(attempts[0].accepted);
    assert!(attempts[0].url.starts_with(&url));
}

#[tokio::test]
async fn callback_status_follows_the_openid() {
    let (url, mut rx) = receiver(StatusCode::OK, "").await;
    let sb = start(config()).await;
    sb.sandbox.set_callback_url(APPID, Some(url));
    sb.sandbox.set_callback_status(OPENID, "failed:user block");
    let token = sb.token().await;
    sb.send(&token, &message(OPENID)).await;
    let event: Event = quick_xml::de::from_str(&next(&mut rx).await.body).expect("xml");
    assert_eq!(event.status, "failed:user block");
    // An empty 200 answer counts as accepted too: one attempt only.
    assert!(sb.sandbox.wait_for_callbacks(1, WAIT).await[0].accepted);
}

#[tokio::test]
async fn a_failing_receiver_gets_three_attempts() {
    let (url, mut rx) = receiver(StatusCode::INTERNAL_SERVER_ERROR, "oops").await;
    let sb = start(config()).await;
    sb.sandbox.set_callback_url(APPID, Some(url));
    let token = sb.token().await;
    let msgid = sb.send(&token, &message(OPENID)).await["msgid"]
        .as_u64()
        .expect("msgid");
    for _ in 0..3 {
        let event: Event = quick_xml::de::from_str(&next(&mut rx).await.body).expect("xml");
        assert_eq!(event.msg_id, msgid);
    }
    let attempts = sb.sandbox.wait_for_callbacks(3, WAIT).await;
    let numbers: Vec<u32> = attempts.iter().map(|a| a.attempt).collect();
    assert_eq!(numbers, [1, 2, 3]);
    assert!(
        attempts
            .iter()
            .all(|a| a.status == Some(500) && !a.accepted)
    );
    // No fourth attempt.
    assert!(
        timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_receiver_answering_something_else_than_success_is_retried() {
    let (url, mut rx) = receiver(StatusCode::OK, "<xml>not success</xml>").await;
    let sb = start(SandboxConfig {
        callback_attempts: 2,
        ..config()
    })
    .await;
    sb.sandbox.set_callback_url(APPID, Some(url));
    let token = sb.token().await;
    sb.send(&token, &message(OPENID)).await;
    next(&mut rx).await;
    next(&mut rx).await;
    let attempts = sb.sandbox.wait_for_callbacks(2, WAIT).await;
    assert!(
        attempts
            .iter()
            .all(|a| a.status == Some(200) && !a.accepted)
    );
}

#[tokio::test]
async fn an_unreachable_receiver_is_recorded_as_an_error() {
    // Bind then drop, so the port is (almost certainly) closed.
    let port = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let sb = start(SandboxConfig {
        callback_attempts: 1,
        ..config()
    })
    .await;
    sb.sandbox
        .set_callback_url(APPID, Some(format!("http://127.0.0.1:{port}/callback")));
    let token = sb.token().await;
    sb.send(&token, &message(OPENID)).await;
    let attempts = sb.sandbox.wait_for_callbacks(1, WAIT).await;
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].error.is_some());
    assert_eq!(attempts[0].status, None);
}

#[tokio::test]
async fn a_duplicate_client_msg_id_triggers_one_callback_only() {
    let (url, mut rx) = receiver(StatusCode::OK, "success").await;
    let sb = start(config()).await;
    sb.sandbox.set_callback_url(APPID, Some(url));
    let token = sb.token().await;
    let mut body = message(OPENID);
    body["client_msg_id"] = json!("order-1001-shipped");
    let first = sb.send(&token, &body).await["msgid"]
        .as_u64()
        .expect("msgid");
    let again = sb.send(&token, &body).await["msgid"]
        .as_u64()
        .expect("msgid");
    assert_eq!(first, again);
    // A later, different message is a marker: once its callback is in, a second callback
    // for the duplicate would have been scheduled before it.
    let marker_openid = "oTEST0000000000000000000009";
    let marker = sb.send(&token, &message(marker_openid)).await["msgid"]
        .as_u64()
        .expect("msgid");

    let mut seen = Vec::new();
    for _ in 0..2 {
        let event: Event = quick_xml::de::from_str(&next(&mut rx).await.body).expect("xml");
        seen.push(event.msg_id);
    }
    seen.sort_unstable();
    assert_eq!(seen, [first, marker]);
    assert!(
        timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err()
    );
    assert_eq!(
        sb.sandbox
            .callbacks()
            .iter()
            .filter(|a| a.msgid == first)
            .count(),
        1
    );
}

#[tokio::test]
async fn no_callback_url_means_no_callback() {
    let sb = start(config()).await;
    let token = sb.token().await;
    assert_eq!(errcode(&sb.send(&token, &message(OPENID)).await), 0);
    assert!(
        sb.sandbox
            .wait_for_callbacks(1, Duration::from_millis(200))
            .await
            .is_empty()
    );
}
