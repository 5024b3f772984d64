//! WeChat subscribe messages through the whole stack: the demo template's `wechat.subscribe`
//! variant goes to the Official Account's `bizsend` (or a mini program's `subscribe/send`),
//! uses up one of the user's acceptances, and the `subscribe_msg_sent_event` callback
//! settles it as delivered; without an acceptance WeChat answers 43101 and the delivery fails
//! for that recipient without a retry.

use herald_contract::channels::WECHAT_SUBSCRIBE;
use herald_contract::v1::{DeliveryState, NotificationRequest};
use herald_e2e::{TestEnv, demo};
use herald_sandbox::paths;
use herald_sender::limit::{AccountKind, AccountSettings};
use serde_json::json;

/// The WeChat template id of the demo template's subscribe variant (examples/templates).
const SUBSCRIBE_TEMPLATE: &str = "sub_order_shipped";

fn subscribe_request(order: &str) -> NotificationRequest {
    let mut request = demo::request(demo::OPENID, order);
    request.id = uuid::Uuid::now_v7().to_string();
    request.channels = vec![WECHAT_SUBSCRIBE.into()];
    request
}

async fn publish(env: &TestEnv, request: &NotificationRequest) {
    env.publish_request(&herald_contract::encode_json(request), Some("guest"), None)
        .await;
}

fn calls_to(env: &TestEnv, path: &str) -> Vec<herald_sandbox::LoggedRequest> {
    env.stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path == path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_subscription_is_sent_once_and_delivered() {
    let mut env = TestEnv::start().await;
    env.stack
        .sandbox
        .grant_subscription(demo::APPID, demo::OPENID, SUBSCRIBE_TEMPLATE, 1);
    let request = subscribe_request("SUB-1");
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Delivered)
        .await;

    let calls = calls_to(&env, paths::SUBSCRIBE_BIZSEND);
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].body,
        json!({
            "touser": demo::OPENID,
            "template_id": SUBSCRIBE_TEMPLATE,
            "page": "pages/orders/detail?id=SUB-1",
            "data": {
                "character_string1": {"value": "SUB-1"},
                "thing2": {"value": "SF Express"},
                "thing3": {"value": "Arrives tomorrow"},
            },
        }),
        "exactly the documented bizsend body: no color, no client_msg_id"
    );
    assert_eq!(
        env.stack
            .sandbox
            .subscriptions_left(demo::APPID, demo::OPENID, SUBSCRIBE_TEMPLATE),
        0,
        "the one acceptance is used up"
    );
    assert!(calls_to(&env, paths::TEMPLATE_SEND).is_empty());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_acceptance_43101_fails_the_recipient_without_retrying() {
    let mut env = TestEnv::start().await;
    let request = subscribe_request("SUB-2");
    publish(&env, &request).await;
    let failed = env
        .wait_for_status(&request.id, DeliveryState::Failed)
        .await;
    assert_eq!(failed.error_code, "43101");
    assert_eq!(
        calls_to(&env, paths::SUBSCRIBE_BIZSEND).len(),
        1,
        "no retry"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mini_program_account_uses_subscribe_send() {
    let mut env = TestEnv::start_with(|config| {
        config.sender.accounts.insert(
            demo::ACCOUNT.into(),
            AccountSettings {
                kind: AccountKind::MiniProgram,
                ..Default::default()
            },
        );
    })
    .await;
    env.stack
        .sandbox
        .grant_subscription(demo::APPID, demo::OPENID, SUBSCRIBE_TEMPLATE, 1);
    let request = subscribe_request("SUB-3");
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Delivered)
        .await;
    let calls = calls_to(&env, paths::SUBSCRIBE_SEND);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].body["template_id"], SUBSCRIBE_TEMPLATE);
    assert!(calls_to(&env, paths::SUBSCRIBE_BIZSEND).is_empty());
    env.stop().await;
}
