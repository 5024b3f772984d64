//! The demo template through the WeCom and group-robot channels: each provider twin receives
//! the documented body (robots: signed, and the sandbox verifies the signature), WeCom fails
//! exactly the member it refuses, and DingTalk's rate-limit answer defers instead of failing.

use herald_contract::channels;
use herald_contract::v1::{DeliveryState, NotificationRequest, Recipient};
use herald_e2e::{TestEnv, demo};
use heraldctl::demo as seed;
use serde_json::json;

fn request(order: &str, channel: &str, recipients: Vec<Recipient>) -> NotificationRequest {
    let mut request = demo::request(demo::OPENID, order);
    request.id = uuid::Uuid::now_v7().to_string();
    request.channels = vec![channel.into()];
    request.recipients = recipients;
    request
}

async fn publish(env: &TestEnv, request: &NotificationRequest) {
    env.publish_request(&herald_contract::encode_json(request), Some("guest"), None)
        .await;
}

fn wecom_user(userid: &str) -> Recipient {
    Recipient {
        wecom_userid: userid.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wecom_sends_per_member_and_fails_only_the_member_it_refuses() {
    let mut env = TestEnv::start().await;
    let request = request(
        "WC-1",
        channels::WECOM,
        vec![
            wecom_user(seed::WECOM_USERID),
            wecom_user("not-a-member"),
            wecom_user("lisi"),
        ],
    );
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Queued)
        .await;
    // Three deliveries settle in any order: read the message until none is pending.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let deliveries = loop {
        let view = env.get_message(&request.id).await;
        let deliveries = view["deliveries"].as_array().cloned().unwrap_or_default();
        let settled = deliveries.len() == 3
            && deliveries
                .iter()
                .all(|d| matches!(d["state"].as_str(), Some("sent" | "failed")));
        if settled {
            break deliveries;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled: {view}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let state_of = |userid: &str| {
        deliveries
            .iter()
            .find(|d| {
                d["recipient"]
                    .as_str()
                    .is_some_and(|r| r.contains(&userid[..2]))
            })
            .map(|d| (d["state"].clone(), d["last_error_code"].clone()))
    };
    assert_eq!(state_of("zhangsan"), Some((json!("sent"), json!(null))));
    assert_eq!(state_of("lisi"), Some((json!("sent"), json!(null))));
    assert_eq!(
        state_of("not-a-member"),
        Some((json!("failed"), json!("81013"))),
        "WeCom: every addressee invalid"
    );

    let messages = env.stack.sandbox.wecom_messages();
    let mut users: Vec<&str> = messages.iter().map(|m| m.userid.as_str()).collect();
    users.sort();
    assert_eq!(users, ["lisi", "zhangsan"]);
    let body = &messages[0].body;
    assert_eq!(body["agentid"], seed::WECOM_AGENT_ID);
    assert_eq!(body["msgtype"], "markdown");
    assert!(
        body["markdown"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("**Order WC-1 shipped**")),
        "{body}"
    );
    assert_eq!(body["enable_duplicate_check"], 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_robots_get_signed_messages() {
    let mut env = TestEnv::start().await;
    let dingtalk = request(
        "RB-1",
        channels::DINGTALK,
        vec![Recipient {
            dingtalk_robot: seed::DINGTALK_ROBOT.into(),
            ..Default::default()
        }],
    );
    let feishu = request(
        "RB-2",
        channels::FEISHU,
        vec![Recipient {
            feishu_robot: seed::FEISHU_ROBOT.into(),
            ..Default::default()
        }],
    );
    publish(&env, &dingtalk).await;
    publish(&env, &feishu).await;
    env.wait_for_statuses(
        &[dingtalk.id.clone(), feishu.id.clone()],
        DeliveryState::Sent,
        std::time::Duration::from_secs(20),
    )
    .await;

    // The sandbox only records what passed its signature check.
    let messages = env.stack.sandbox.robot_messages();
    let ding = messages
        .iter()
        .find(|m| m.kind == herald_sandbox::RobotKind::Dingtalk)
        .expect("a DingTalk message");
    assert_eq!(
        ding.body,
        json!({
            "msgtype": "actionCard",
            "actionCard": {
                "title": "Order RB-1 shipped",
                "text": "### Order RB-1 shipped\nSF Express delivers it tomorrow.",
                "singleTitle": "Track it",
                "singleURL": "https://shop.example.com/orders/RB-1",
            },
        })
    );
    let lark = messages
        .iter()
        .find(|m| m.kind == herald_sandbox::RobotKind::Feishu)
        .expect("a Feishu message");
    assert_eq!(lark.body["msg_type"], "post");
    assert!(lark.body["sign"].is_string() && lark.body["timestamp"].is_string());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dingtalks_rate_limit_answer_defers_the_message() {
    let mut env = TestEnv::start().await;
    env.stack
        .sandbox
        .inject_errors(herald_sandbox::paths::DINGTALK_ROBOT, vec![130101]);
    let request = request(
        "RB-3",
        channels::DINGTALK,
        vec![Recipient {
            dingtalk_robot: seed::DINGTALK_ROBOT.into(),
            ..Default::default()
        }],
    );
    publish(&env, &request).await;
    let deferred = env
        .wait_for_status(&request.id, DeliveryState::Deferred)
        .await;
    assert_eq!(deferred.error_code, "130101");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_robot_of_another_tenant_is_refused_by_name() {
    let env = TestEnv::start().await;
    let request = request(
        "RB-4",
        channels::DINGTALK,
        vec![Recipient {
            dingtalk_robot: "someone-elses-robot".into(),
            ..Default::default()
        }],
    );
    publish(&env, &request).await;
    let dead = env.next_dead_letter().await;
    let detail = herald_amqp::header_str(
        dead.properties.headers().as_ref(),
        herald_contract::headers::DEAD_DETAIL,
    )
    .unwrap_or_default()
    .to_string();
    assert!(detail.contains("recipients[0].dingtalk_robot"), "{detail}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wecom_group_robot_gets_the_wecom_variant() {
    let mut env = TestEnv::start().await;
    let request = request(
        "RB-5",
        channels::WECOM_ROBOT,
        vec![Recipient {
            wecom_robot: seed::WECOM_ROBOT.into(),
            ..Default::default()
        }],
    );
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Sent).await;
    let messages = env.stack.sandbox.robot_messages();
    let robot = messages
        .iter()
        .find(|m| m.kind == herald_sandbox::RobotKind::Wecom)
        .expect("a WeCom robot message");
    assert_eq!(robot.body["msgtype"], "markdown");
    assert!(
        robot.body["markdown"]["content"]
            .as_str()
            .is_some_and(|c| c.starts_with("**Order RB-5 shipped**")),
        "{}",
        robot.body
    );
    env.stop().await;
}
