//! Audience: directory recipients by user id, opt-outs by channel and category, quiet hours in
//! the recipient's time zone (urgent passes), frequency caps and content de-duplication, each
//! suppression or deferral recorded with its reason.

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use herald_contract::encode_json;
use herald_contract::v1::{DeliveryState, Priority, Recipient};
use herald_e2e::{TestEnv, demo, openid};
use serde_json::{Value, json};

/// Publishes the demo request (order `order`) to `recipient` with `priority`; answers its id.
async fn send_to(env: &TestEnv, recipient: Recipient, order: &str, priority: Priority) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let mut request = demo::request(demo::OPENID, order);
    request.id = id.clone();
    request.recipients = vec![recipient];
    request.priority = priority as i32;
    env.publish_request(&encode_json(&request), Some("guest"), None)
        .await;
    id
}

fn user(id: &str) -> Recipient {
    Recipient {
        user_id: id.into(),
        ..Default::default()
    }
}

fn direct(openid: &str) -> Recipient {
    Recipient {
        wechat_openid: openid.into(),
        ..Default::default()
    }
}

async fn put(env: &TestEnv, path: &str, body: Value) -> reqwest::Response {
    env.http
        .put(format!("{}{path}", env.stack.ingress_url))
        .bearer_auth(demo::API_KEY)
        .json(&body)
        .send()
        .await
        .expect("ingress answers")
}

async fn get(env: &TestEnv, path: &str) -> reqwest::Response {
    env.http
        .get(format!("{}{path}", env.stack.ingress_url))
        .bearer_auth(demo::API_KEY)
        .send()
        .await
        .expect("ingress answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_users_are_resolved_managed_and_opted_out() {
    let mut env = TestEnv::start().await;
    let alice = openid(10);
    let created = put(
        &env,
        "/v1/recipients/alice",
        json!({
            "timezone": "Asia/Shanghai",
            "addresses": {"wechat_openids": {demo::APPID: alice}, "email": "alice@example.com"}
        }),
    )
    .await;
    assert_eq!(created.status(), 201);
    let replaced = put(
        &env,
        "/v1/recipients/alice",
        json!({"addresses": {"wechat_openids": {demo::APPID: alice}}}),
    )
    .await;
    assert_eq!(replaced.status(), 200);
    let bad = put(
        &env,
        "/v1/recipients/bob",
        json!({"timezone": "Mars/Olympus"}),
    )
    .await;
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.expect("JSON");
    assert_eq!(bad["field"], "timezone");
    let unknown_field = put(&env, "/v1/recipients/bob", json!({"adresses": {}})).await;
    assert_eq!(unknown_field.status(), 400);

    // By user id: the directory's openid for the sending account's appid.
    let id = send_to(&env, user("alice"), "D-1", Priority::Normal).await;
    env.wait_for_status(&id, DeliveryState::Sent).await;
    assert_eq!(env.sends_to(&alice).len(), 1);

    // Unknown user: suppressed with its reason, not a rejected request.
    let id = send_to(&env, user("nobody"), "D-2", Priority::Normal).await;
    let event = env.wait_for_status(&id, DeliveryState::Suppressed).await;
    assert_eq!(event.error_code, "unknown_recipient");

    // Opted out of the channel, and of the template's category (`order`).
    put(
        &env,
        "/v1/recipients/carol",
        json!({"addresses": {"wechat_openids": {demo::APPID: openid(11)}},
               "preferences": {"opt_out_channels": ["wechat.template"]}}),
    )
    .await;
    let id = send_to(&env, user("carol"), "D-3", Priority::Normal).await;
    let event = env.wait_for_status(&id, DeliveryState::Suppressed).await;
    assert_eq!(event.error_code, "opted_out");
    assert!(event.error_message.contains("wechat.template"));
    put(
        &env,
        "/v1/recipients/dave",
        json!({"addresses": {"wechat_openids": {demo::APPID: openid(12)}},
               "preferences": {"opt_out_categories": ["order"]}}),
    )
    .await;
    let id = send_to(&env, user("dave"), "D-4", Priority::Normal).await;
    let event = env.wait_for_status(&id, DeliveryState::Suppressed).await;
    assert_eq!(event.error_code, "opted_out");
    assert!(event.error_message.contains("`order`"));
    assert!(env.sends_to(&openid(11)).is_empty() && env.sends_to(&openid(12)).is_empty());

    // Tenant default: everyone opted out of `order`, but a recipient's own list overrides it.
    put(
        &env,
        "/v1/preferences",
        json!({"opt_out_categories": ["order"]}),
    )
    .await;
    let id = send_to(&env, direct(&openid(13)), "D-5", Priority::Normal).await;
    assert_eq!(
        env.wait_for_status(&id, DeliveryState::Suppressed)
            .await
            .error_code,
        "opted_out"
    );
    put(
        &env,
        "/v1/recipients/erin",
        json!({"addresses": {"wechat_openids": {demo::APPID: openid(14)}},
               "preferences": {"opt_out_categories": []}}),
    )
    .await;
    let id = send_to(&env, user("erin"), "D-6", Priority::Normal).await;
    env.wait_for_status(&id, DeliveryState::Sent).await;

    // Read, list, delete.
    let alice_view: Value = get(&env, "/v1/recipients/alice")
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        alice_view["addresses"]["wechat_openids"][demo::APPID],
        alice
    );
    let page: Value = get(&env, "/v1/recipients?limit=2")
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(page["recipients"][0]["user_id"], "alice");
    assert_eq!(page["next_after"], "carol");
    let deleted = env
        .http
        .delete(format!("{}/v1/recipients/alice", env.stack.ingress_url))
        .bearer_auth(demo::API_KEY)
        .send()
        .await
        .expect("ingress answers");
    assert_eq!(deleted.status(), 204);
    assert_eq!(get(&env, "/v1/recipients/alice").await.status(), 404);
    env.stop().await;
}

/// 23:00 in Shanghai tomorrow: inside 22:00–08:00 quiet hours, and in the future, so the
/// deferral's end is too.
fn late_evening_in_shanghai() -> (DateTime<Utc>, DateTime<Utc>) {
    let shanghai = chrono_tz::Asia::Shanghai;
    let tomorrow = Utc::now().with_timezone(&shanghai).date_naive() + Duration::days(1);
    let at = |date: chrono::NaiveDate, h| {
        shanghai
            .from_local_datetime(
                &date.and_time(NaiveTime::from_hms_opt(h, 0, 0).unwrap_or_default()),
            )
            .single()
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default()
    };
    (at(tomorrow, 23), at(tomorrow + Duration::days(1), 8))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_defer_to_the_end_of_the_window_and_urgent_passes() {
    let (now, window_end) = late_evening_in_shanghai();
    let mut env = TestEnv::start_with(|config| config.renderer.fixed_now = Some(now)).await;
    put(
        &env,
        "/v1/recipients/night-owl",
        json!({"timezone": "Asia/Shanghai",
               "addresses": {"wechat_openids": {demo::APPID: openid(20)}},
               "preferences": {"quiet_hours": {"start": "22:00:00", "end": "08:00:00"}}}),
    )
    .await;
    let id = send_to(&env, user("night-owl"), "Q-1", Priority::Normal).await;
    let event = env.wait_for_status(&id, DeliveryState::Deferred).await;
    assert_eq!(event.error_code, "quiet_hours");
    let db = env.db().await;
    let due: DateTime<Utc> = db
        .query_one(
            "SELECT due_at FROM scheduled_jobs WHERE message_id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("held-back job")
        .get(0);
    assert_eq!(due, window_end, "held until 08:00 in Shanghai");

    let urgent = send_to(&env, user("night-owl"), "Q-2", Priority::Urgent).await;
    env.wait_for_status(&urgent, DeliveryState::Sent).await;
    let sends = env.sends_to(&openid(20));
    assert_eq!(sends.len(), 1, "only the urgent one went out");
    assert_eq!(sends[0].body["data"]["order_id"]["value"], "Q-2");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frequency_cap_suppresses_past_its_limit() {
    let mut env = TestEnv::start().await;
    let response = put(
        &env,
        "/v1/preferences",
        json!({"frequency_caps": [{"template": demo::TEMPLATE, "max": 2, "window": "1h"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let to = openid(30);
    for order in ["C-1", "C-2"] {
        let id = send_to(&env, direct(&to), order, Priority::Normal).await;
        env.wait_for_status(&id, DeliveryState::Queued).await;
    }
    let id = send_to(&env, direct(&to), "C-3", Priority::Normal).await;
    let event = env.wait_for_status(&id, DeliveryState::Suppressed).await;
    assert_eq!(event.error_code, "frequency_cap");
    // Another recipient has a cap of its own.
    let other = send_to(&env, direct(&openid(31)), "C-4", Priority::Normal).await;
    env.wait_for_status(&other, DeliveryState::Queued).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_content_twice_within_the_window_is_a_duplicate() {
    let mut env = TestEnv::start().await;
    put(&env, "/v1/preferences", json!({"dedup_window": "10m"})).await;
    let to = openid(40);
    let first = send_to(&env, direct(&to), "X-1", Priority::Normal).await;
    env.wait_for_status(&first, DeliveryState::Sent).await;
    let again = send_to(&env, direct(&to), "X-1", Priority::Normal).await;
    let event = env.wait_for_status(&again, DeliveryState::Suppressed).await;
    assert_eq!(event.error_code, "duplicate");
    // Other content is not a duplicate.
    let other = send_to(&env, direct(&to), "X-2", Priority::Normal).await;
    env.wait_for_status(&other, DeliveryState::Sent).await;
    assert_eq!(env.sends_to(&to).len(), 2);
    env.stop().await;
}
