//! Scheduling and expiry: `send_at` holds a message in Postgres and sends it on time (±1 s),
//! also across a renderer restart; `expires_at` ends what was not sent in time as `expired`;
//! a cancelled message sends nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_contract::v1::DeliveryState;
use herald_contract::{Timestamp, encode_json};
use herald_e2e::{TestEnv, demo, openid};

fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Publishes the demo request to `to` with `send_at` / `expires_at`; answers its id.
async fn send(
    env: &TestEnv,
    to: &str,
    send_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let mut request = demo::request(to, "S-1");
    request.id = id.clone();
    request.send_at = send_at.map(timestamp);
    request.expires_at = expires_at.map(timestamp);
    env.publish_request(&encode_json(&request), Some("guest"), None)
        .await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_at_is_kept_across_a_renderer_restart_and_met_within_a_second() {
    let mut env = TestEnv::start_with(|config| config.external_renderer = true).await;
    let first = env.stack.spawn_renderer(|_| {});
    let to = openid(1);
    let send_at = Utc::now() + chrono::Duration::seconds(3);
    let id = send(&env, &to, Some(send_at), None).await;
    let deferred = env.wait_for_status(&id, DeliveryState::Deferred).await;
    assert_eq!(deferred.error_code, "scheduled");
    // The renderer that scheduled it goes away; another one releases it.
    first.stop().await.expect("first renderer stops");
    let second = env.stack.spawn_renderer(|_| {});
    env.wait_for_status(&id, DeliveryState::Sent).await;
    let sends = env.sends_to(&to);
    assert_eq!(sends.len(), 1, "one send");
    let late = sends[0].at - send_at;
    assert!(
        late >= chrono::Duration::zero() && late <= chrono::Duration::seconds(1),
        "sent {late:?} after send_at"
    );
    let view = env.get_message(&id).await;
    assert_eq!(
        herald_e2e::timeline(&view)[..3],
        ["deferred", "sending", "sent"]
    );
    second.stop().await.expect("second renderer stops");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_expires_at_is_expired_by_the_sender_and_not_sent() {
    // No sender yet: the job waits in its queue past its expiry.
    let mut env = TestEnv::start_with(|config| config.sender.channels = vec![]).await;
    let to = openid(2);
    let expires_at = Utc::now() + chrono::Duration::milliseconds(1500);
    let id = send(&env, &to, None, Some(expires_at)).await;
    env.wait_for_status(&id, DeliveryState::Queued).await;
    // Waiting for the clock itself: there is no event to await.
    let wait = (expires_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait).await;
    let sender = env.stack.spawn_sender(|_| {});
    let expired = env.wait_for_status(&id, DeliveryState::Expired).await;
    assert_eq!(expired.error_code, "expired");
    sender.stop().await.expect("sender stops");
    assert!(env.sends_to(&to).is_empty(), "nothing sent");
    let view = env.get_message(&id).await;
    assert_eq!(view["state"], "expired");
    assert_eq!(herald_e2e::timeline(&view), ["queued", "expired"]);
    env.stop().await;
}

/// `GET /v1/messages/{id}`, or `None` while the message is not stored yet.
async fn message_if_stored(env: &TestEnv, id: &str) -> Option<serde_json::Value> {
    let response = env
        .http
        .get(format!("{}/v1/messages/{id}", env.stack.ingress_url))
        .bearer_auth(demo::API_KEY)
        .send()
        .await
        .expect("ingress answers");
    if response.status() == 404 {
        return None;
    }
    Some(response.json().await.expect("JSON view"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_expired_before_rendering_makes_no_delivery() {
    let env = TestEnv::start().await;
    let expires_at = Utc::now() - chrono::Duration::seconds(1);
    let id = send(&env, &openid(3), None, Some(expires_at)).await;
    let deadline = tokio::time::Instant::now() + herald_e2e::WAIT;
    let view = loop {
        let view = message_if_stored(&env, &id).await;
        if view.as_ref().is_some_and(|v| v["state"] == "expired") {
            break view.unwrap_or_default();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not expired: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        view["error"]
            .as_str()
            .is_some_and(|e| e.contains("before it was rendered")),
        "{view}"
    );
    assert_eq!(view["deliveries"], serde_json::json!([]));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_scheduled_message_sends_nothing() {
    let mut env = TestEnv::start().await;
    let to = openid(4);
    let send_at = Utc::now() + chrono::Duration::seconds(30);
    let id = send(&env, &to, Some(send_at), None).await;
    env.wait_for_status(&id, DeliveryState::Deferred).await;
    let response = env
        .http
        .post(format!("{}/v1/messages/{id}/cancel", env.stack.ingress_url))
        .bearer_auth(demo::API_KEY)
        .send()
        .await
        .expect("ingress answers");
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(answer["cancelled"], 1, "{answer}");
    assert_eq!(answer["state"], "expired");
    let event = env.wait_for_status(&id, DeliveryState::Expired).await;
    assert_eq!(event.error_code, "cancelled");
    // The held-back job is gone with it, so nothing can be released later.
    let db = env.db().await;
    let held: i64 = db
        .query_one(
            "SELECT count(*) FROM scheduled_jobs WHERE message_id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(held, 0);
    // A second cancellation changes nothing; an unknown message is a 404.
    let again: serde_json::Value = env
        .http
        .post(format!("{}/v1/messages/{id}/cancel", env.stack.ingress_url))
        .bearer_auth(demo::API_KEY)
        .send()
        .await
        .expect("ingress answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(again["cancelled"], 0);
    let unknown = env
        .http
        .post(format!(
            "{}/v1/messages/{}/cancel",
            env.stack.ingress_url,
            uuid::Uuid::now_v7()
        ))
        .bearer_auth(demo::API_KEY)
        .send()
        .await
        .expect("ingress answers");
    assert_eq!(unknown.status(), 404);
    assert!(env.sends_to(&to).is_empty());
    let view = env.get_message(&id).await;
    assert_eq!(
        view["counts"],
        serde_json::json!({"expired": 1}),
        "{view:#}"
    );
    env.stop().await;
}
