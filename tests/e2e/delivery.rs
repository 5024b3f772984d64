//! How the sender settles a delivery by the provider's answer: retry through the delay tiers,
//! one token refresh, permanent failures, exhausted attempts.

use herald_contract::headers;
use herald_contract::v1::DeliveryState;
use herald_e2e::{TestEnv, demo, timeline};
use herald_sandbox::paths;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_busy_is_retried_from_a_delay_tier_with_the_same_client_msg_id() {
    let mut env = TestEnv::start().await;
    env.stack
        .sandbox
        .inject_errors(paths::TEMPLATE_SEND, vec![-1]);
    let id = env.send_demo(demo::OPENID, "RT-1").await;
    env.wait_for_status(&id, DeliveryState::Retrying).await;
    env.wait_for_status(&id, DeliveryState::Delivered).await;

    let view = env.get_message(&id).await;
    assert_eq!(
        timeline(&view),
        [
            "queued",
            "sending",
            "retrying",
            "sending",
            "sent",
            "delivered"
        ]
    );
    assert_eq!(view["deliveries"][0]["attempts"], 2);
    assert_eq!(view["deliveries"][0]["last_error_code"], "-1");
    let sends = env.sends_to(demo::OPENID);
    assert_eq!(sends.len(), 2);
    assert_eq!(
        sends[0].body["client_msg_id"], sends[1].body["client_msg_id"],
        "retries are idempotent at WeChat"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_reported_once_and_the_send_retried_at_once() {
    let mut env = TestEnv::start().await;
    env.stack
        .sandbox
        .inject_errors(paths::TEMPLATE_SEND, vec![40001]);
    let id = env.send_demo(demo::OPENID, "TK-1").await;
    env.wait_for_status(&id, DeliveryState::Delivered).await;

    let view = env.get_message(&id).await;
    assert_eq!(
        view["deliveries"][0]["attempts"], 1,
        "the refresh is part of the same attempt"
    );
    assert_eq!(timeline(&view), ["queued", "sending", "sent", "delivered"]);
    let sends = env.sends_to(demo::OPENID);
    assert_eq!(sends.len(), 2);
    assert_ne!(
        sends[0].query.get("access_token"),
        sends[1].query.get("access_token"),
        "the second send used the refreshed token"
    );
    let forced: Vec<_> = env
        .stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path == paths::STABLE_TOKEN && r.body["force_refresh"] == true)
        .collect();
    assert_eq!(forced.len(), 1, "exactly one forced refresh");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_openid_fails_for_good_without_retrying() {
    let mut env = TestEnv::start().await;
    env.stack
        .sandbox
        .inject_errors(paths::TEMPLATE_SEND, vec![40003]);
    let id = env.send_demo(demo::OPENID, "P-1").await;
    let failed = env.wait_for_status(&id, DeliveryState::Failed).await;
    assert_eq!(failed.error_code, "40003");
    assert!(
        failed.error_message.starts_with("invalid openid"),
        "{}",
        failed.error_message
    );

    let view = env.get_message(&id).await;
    assert_eq!(view["state"], "failed");
    assert_eq!(timeline(&view), ["queued", "sending", "failed"]);
    assert_eq!(env.sends_to(demo::OPENID).len(), 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_fail_the_delivery_and_park_the_job() {
    let mut env = TestEnv::start_with(|config| config.sender.max_attempts = 2).await;
    env.stack
        .sandbox
        .inject_errors(paths::TEMPLATE_SEND, vec![-1, -1]);
    let id = env.send_demo(demo::OPENID, "X-1").await;
    let failed = env.wait_for_status(&id, DeliveryState::Failed).await;
    assert_eq!(failed.error_code, "-1");
    assert!(
        failed.error_message.contains("gave up after 2 attempts"),
        "{}",
        failed.error_message
    );

    let dead = env.next_dead_letter().await;
    let table = dead.properties.headers().clone();
    assert_eq!(
        herald_amqp::header_str(table.as_ref(), headers::DEAD_REASON),
        Some("exhausted")
    );
    assert_eq!(
        herald_amqp::header_u32(table.as_ref(), headers::ATTEMPT),
        Some(2)
    );
    assert_eq!(env.sends_to(demo::OPENID).len(), 2);
    env.stop().await;
}
