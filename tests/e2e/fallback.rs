//! Fallback chains: a request's channels in order; when a delivery fails for the recipient
//! (WeChat 43101: no subscription; 43004: not following) or gives up after its retries, the
//! next channel the recipient has an address for takes over, and the message's timeline shows
//! both.

use std::time::Duration;

use herald_contract::channels;
use herald_contract::v1::{DeliveryState, NotificationRequest, Recipient};
use herald_e2e::{TestEnv, demo};
use heraldctl::demo as seed;
use serde_json::Value;

fn request(order: &str, chain: &[&str]) -> NotificationRequest {
    let mut request = demo::request(demo::OPENID, order);
    request.id = uuid::Uuid::now_v7().to_string();
    request.channels = chain.iter().map(|c| c.to_string()).collect();
    request.recipients = vec![Recipient {
        wechat_openid: demo::OPENID.into(),
        wecom_userid: seed::WECOM_USERID.into(),
        ..Default::default()
    }];
    request
}

/// The message's deliveries once both have settled, keyed by channel.
async fn settled(env: &TestEnv, id: &str) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view = env.get_message(id).await;
        let deliveries = view["deliveries"].as_array().cloned().unwrap_or_default();
        if deliveries.len() == 2
            && deliveries
                .iter()
                .all(|d| matches!(d["state"].as_str(), Some("sent" | "delivered" | "failed")))
        {
            return deliveries;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn on<'a>(deliveries: &'a [Value], channel: &str) -> &'a Value {
    deliveries
        .iter()
        .find(|d| d["channel"] == channel)
        .unwrap_or_else(|| panic!("no {channel} delivery in {deliveries:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_subscription_falls_back_to_the_next_channel() {
    let mut env = TestEnv::start().await;
    // No acceptance granted: WeChat answers 43101 to the subscribe message.
    let request = request("FB-1", &[channels::WECHAT_SUBSCRIBE, channels::WECOM]);
    env.publish_request(&herald_contract::encode_json(&request), Some("guest"), None)
        .await;
    env.wait_for_status(&request.id, DeliveryState::Queued)
        .await;
    let deliveries = settled(&env, &request.id).await;

    let subscribe = on(&deliveries, channels::WECHAT_SUBSCRIBE);
    assert_eq!(subscribe["state"], "failed");
    assert_eq!(subscribe["last_error_code"], "43101");
    let wecom = on(&deliveries, channels::WECOM);
    assert_eq!(wecom["state"], "sent");
    let queued = &wecom["timeline"][0];
    assert_eq!(queued["state"], "queued");
    assert_eq!(queued["source"], "fallback");
    assert_eq!(queued["detail"]["after"], subscribe["id"]);
    assert_eq!(env.stack.sandbox.wecom_messages().len(), 1);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_gives_up_falls_back_instead_of_parking() {
    let mut env = TestEnv::start_with(|config| {
        config.sender.max_attempts = 2;
    })
    .await;
    // WeChat is busy for both attempts of the template message.
    env.stack
        .sandbox
        .inject_errors(herald_sandbox::paths::TEMPLATE_SEND, vec![-1, -1]);
    let request = request("FB-2", &[channels::WECHAT_TEMPLATE, channels::WECOM]);
    env.publish_request(&herald_contract::encode_json(&request), Some("guest"), None)
        .await;
    env.wait_for_status(&request.id, DeliveryState::Queued)
        .await;
    let deliveries = settled(&env, &request.id).await;
    let template = on(&deliveries, channels::WECHAT_TEMPLATE);
    assert_eq!(template["state"], "failed");
    assert_eq!(template["attempts"], 2);
    assert_eq!(on(&deliveries, channels::WECOM)["state"], "sent");
    // The given-up job was not parked: the fallback handled it.
    let dead = env.broker.topology().dead_queue();
    assert_eq!(env.queue_depth(&dead).await, 0);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_who_unfollowed_gets_the_next_channel_at_once() {
    let mut env = TestEnv::start().await;
    // The user unfollows the Official Account (WeChat's `unsubscribe` event).
    let event = format!(
        "<xml><ToUserName><![CDATA[gh_demo00000001]]></ToUserName>\
         <FromUserName><![CDATA[{}]]></FromUserName><CreateTime>{}</CreateTime>\
         <MsgType><![CDATA[event]]></MsgType><Event><![CDATA[unsubscribe]]></Event></xml>",
        demo::OPENID,
        chrono::Utc::now().timestamp() - 5
    );
    let attempt = env
        .stack
        .sandbox
        .post_callback(demo::APPID, demo::OPENID, &event)
        .await
        .expect("callback URL");
    assert!(attempt.accepted, "{attempt:?}");
    let db = env.db().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let row = db
            .query_opt(
                "SELECT following FROM recipient_follows WHERE recipient = $1",
                &[&demo::OPENID],
            )
            .await
            .expect("follow state");
        if row.is_some_and(|r| !r.get::<_, bool>(0)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "unfollow not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let request = request("FB-3", &[channels::WECHAT_TEMPLATE, channels::WECOM]);
    env.publish_request(&herald_contract::encode_json(&request), Some("guest"), None)
        .await;
    env.wait_for_status(&request.id, DeliveryState::Queued)
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let deliveries = loop {
        let view = env.get_message(&request.id).await;
        let deliveries = view["deliveries"].as_array().cloned().unwrap_or_default();
        if deliveries.len() == 2
            && deliveries
                .iter()
                .all(|d| matches!(d["state"].as_str(), Some("sent" | "suppressed")))
        {
            break deliveries;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let template = on(&deliveries, channels::WECHAT_TEMPLATE);
    assert_eq!(template["state"], "suppressed");
    assert_eq!(template["last_error_code"], "unsubscribed");
    assert_eq!(on(&deliveries, channels::WECOM)["state"], "sent");
    assert!(
        env.stack
            .sandbox
            .requests()
            .iter()
            .all(|r| r.path != herald_sandbox::paths::TEMPLATE_SEND),
        "nothing went to the Official Account"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_past_the_channels_deadline_falls_back() {
    let env = TestEnv::start_with(|config| {
        config.sender.policies.insert(
            channels::WECHAT_TEMPLATE.into(),
            herald_sender::policy::PolicyOverride {
                fallback_after: Some("10m".into()),
                ..Default::default()
            },
        );
    })
    .await;
    // The account's daily quota is used up: WeChat would take it again only at midnight in
    // Beijing, later than the template channel's ten minutes.
    env.stack
        .sandbox
        .inject_errors(herald_sandbox::paths::TEMPLATE_SEND, vec![45009]);
    let mut env = env;
    let request = request("FB-4", &[channels::WECHAT_TEMPLATE, channels::WECOM]);
    env.publish_request(&herald_contract::encode_json(&request), Some("guest"), None)
        .await;
    env.wait_for_status(&request.id, DeliveryState::Queued)
        .await;
    let deliveries = settled(&env, &request.id).await;
    let template = on(&deliveries, channels::WECHAT_TEMPLATE);
    assert_eq!(template["state"], "failed");
    assert_eq!(template["last_error_code"], "45009");
    assert_eq!(on(&deliveries, channels::WECOM)["state"], "sent");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wechat_template_refused_with_43101_falls_back_to_sms() {
    let mut env = TestEnv::start().await;
    // WeChat refuses the template message for this user: 43101 (a recipient failure).
    env.stack
        .sandbox
        .inject_errors(herald_sandbox::paths::TEMPLATE_SEND, vec![43101]);
    let mut request = request("FB-SMS", &[channels::WECHAT_TEMPLATE, channels::SMS]);
    request.recipients = vec![Recipient {
        wechat_openid: demo::OPENID.into(),
        phone: seed::SMS_PHONE.into(),
        ..Default::default()
    }];
    env.publish_request(&herald_contract::encode_json(&request), Some("guest"), None)
        .await;
    env.wait_for_status(&request.id, DeliveryState::Failed)
        .await;
    // The SMS goes out and its receipt reports it delivered.
    env.wait_for_status(&request.id, DeliveryState::Delivered)
        .await;
    let deliveries = settled(&env, &request.id).await;

    let template = on(&deliveries, channels::WECHAT_TEMPLATE);
    assert_eq!(template["state"], "failed");
    assert_eq!(template["last_error_code"], "43101");
    let states = |d: &Value| -> Vec<String> {
        d["timeline"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|e| e["state"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Both attempts are in the message's timeline: the template's, ending failed…
    let template_states = states(template);
    assert_eq!(template_states.first().map(String::as_str), Some("queued"));
    assert_eq!(template_states.last().map(String::as_str), Some("failed"));
    // …and the SMS, queued by the fallback, sent, then delivered by its receipt.
    let sms = on(&deliveries, channels::SMS);
    assert_eq!(sms["state"], "delivered", "{sms}");
    assert_eq!(sms["provider_account"], seed::SMS_ALIYUN_ACCOUNT);
    let queued = &sms["timeline"][0];
    assert_eq!(queued["state"], "queued");
    assert_eq!(queued["source"], "fallback");
    assert_eq!(queued["detail"]["after"], template["id"]);
    assert_eq!(queued["detail"]["code"], "43101");
    let sms_states = states(sms);
    assert!(
        sms_states.ends_with(&["sent".to_string(), "delivered".to_string()]),
        "{sms_states:?}"
    );
    let sent = env.stack.sandbox.sms_messages();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].phone, "13800138000");
    assert_eq!(sms["provider_msgid"], sent[0].msgid.as_str());
    env.stop().await;
}
