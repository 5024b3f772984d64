//! A worker dies after WeChat took the send but before the outcome was stored and the job
//! acked: the broker hands the job to another worker, which sends again with the same
//! client_msg_id, so WeChat answers the first message's msgid and the user gets one message.

use std::time::Duration;

use herald_contract::v1::DeliveryState;
use herald_e2e::{TestEnv, demo};
use herald_sandbox::{Fault, paths};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_abandoned_mid_send_is_redelivered_and_sent_once() {
    let mut env = TestEnv::start_with(|config| config.sender.channels = vec![]).await;
    // WeChat processes the send but its answer takes 30 s: the worker is stuck in the call.
    env.stack
        .sandbox
        .inject_faults(paths::TEMPLATE_SEND, vec![Fault::Delay { ms: 30_000 }]);
    let first = env.stack.spawn_sender(|config| {
        config.sender.drain_timeout_ms = 200;
        config.sender.request_timeout_ms = 60_000;
    });
    let id = env.send_demo(demo::OPENID, "C-1").await;
    let accepted = env
        .stack
        .sandbox
        .wait_for_accepted_sends(1, Duration::from_secs(20))
        .await;
    assert_eq!(accepted.len(), 1, "WeChat took the send");

    // The worker is stopped mid-call: its drain times out, the job task is aborted before
    // anything is stored or acked, and its connection closes.
    first.stop().await.expect("first worker stops");
    let db = env.db().await;
    let row = db
        .query_one(
            "SELECT state, attempt FROM deliveries WHERE message_id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("delivery row");
    assert_eq!(row.get::<_, String>(0), "sending", "no outcome was stored");

    let second = env.stack.spawn_sender(|_| {});
    env.wait_for_status(&id, DeliveryState::Sent).await;
    second.stop().await.expect("second worker stops");

    let calls: Vec<_> = env
        .stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path == paths::TEMPLATE_SEND && r.body["touser"] == demo::OPENID)
        .collect();
    // The first call is logged once its late answer is written (after the 30 s); the
    // redelivered one is there now.
    assert!(!calls.is_empty());
    assert_eq!(
        calls[calls.len() - 1].body["client_msg_id"],
        accepted[0]
            .client_msg_id
            .clone()
            .map(serde_json::Value::String)
            .unwrap_or_default(),
        "the redelivered job sent with the same client_msg_id"
    );
    let delivered: Vec<_> = env
        .stack
        .sandbox
        .accepted_sends()
        .into_iter()
        .filter(|s| s.openid == demo::OPENID)
        .collect();
    assert_eq!(delivered.len(), 1, "no second delivery to the recipient");
    let row = db
        .query_one(
            "SELECT attempt, provider_msgid FROM deliveries WHERE message_id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("delivery row");
    assert_eq!(row.get::<_, i32>(0), 2, "claimed twice");
    assert_eq!(
        row.get::<_, Option<String>>(1),
        Some(delivered[0].msgid.to_string()),
        "the stored msgid is the first send's"
    );
    env.stop().await;
}
