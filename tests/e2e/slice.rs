//! The walking skeleton end to end: a WeChat template notification from a producer (over AMQP
//! or REST) through renderer, sender, token service, sandbox provider and callback receiver
//! to `delivered`.

use herald_contract::v1::DeliveryState;
use herald_contract::{encode_json, headers};
use herald_e2e::{TestEnv, demo, new_traceparent};
use herald_sandbox::paths;
use serde_json::Value;

fn demo_request_json(openid: &str, order: &str) -> Value {
    serde_json::from_slice(&encode_json(&demo::request(openid, order))).expect("request JSON")
}

/// What every delivered-path test checks: the view, the one provider send, and one trace.
async fn assert_delivered_once(
    env: &TestEnv,
    message_id: &str,
    openid: &str,
    order: &str,
    trace_id: &str,
) {
    let view = env.get_message(message_id).await;
    assert_eq!(view["state"], "delivered", "{view:#}");
    let delivery = &view["deliveries"][0];
    assert_eq!(delivery["state"], "delivered");
    assert_eq!(delivery["recipient"], openid);
    let states: Vec<&str> = delivery["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert_eq!(states, ["queued", "sending", "sent", "delivered"]);

    let sends: Vec<_> = env
        .stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path == paths::TEMPLATE_SEND && r.body["touser"] == openid)
        .collect();
    assert_eq!(sends.len(), 1, "exactly one send to the provider");
    let body = &sends[0].body;
    assert_eq!(body["template_id"], demo::WECHAT_TEMPLATE_ID);
    assert_eq!(body["data"]["order_id"]["value"], order);
    assert_eq!(body["data"]["order_id"]["color"], "#173177");
    assert_eq!(body["data"]["carrier"]["value"], "SF Express");
    assert_eq!(
        body["url"],
        format!("https://shop.example.com/orders/{order}")
    );
    assert_eq!(body["client_msg_id"].as_str().map(str::len), Some(32));
    assert_eq!(
        delivery["provider_msgid"].as_str(),
        sends[0].response["msgid"]
            .as_u64()
            .map(|m| m.to_string())
            .as_deref()
    );

    // One trace from the producer's publish to the provider call and the callback.
    let provider_trace = sends[0]
        .headers
        .get(headers::TRACEPARENT)
        .and_then(|tp| herald_telemetry::trace_id_of(tp))
        .map(str::to_string);
    assert_eq!(
        provider_trace.as_deref(),
        Some(trace_id),
        "the provider call carries the trace: {:?}",
        sends[0].headers
    );
    for entry in delivery["timeline"].as_array().expect("timeline") {
        assert_eq!(
            entry["trace_id"], trace_id,
            "hop {} is in the producer's trace",
            entry["state"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_request_is_delivered_end_to_end() {
    let mut env = TestEnv::start().await;
    let (traceparent, trace_id) = new_traceparent();
    let message_id = uuid::Uuid::now_v7().to_string();
    let mut request = demo_request_json(demo::OPENID, "A-100");
    request["id"] = Value::String(message_id.clone());
    env.publish_request(
        request.to_string().as_bytes(),
        Some("guest"),
        Some(&traceparent),
    )
    .await;

    env.wait_for_status(&message_id, DeliveryState::Delivered)
        .await;
    assert_delivered_once(&env, &message_id, demo::OPENID, "A-100", &trace_id).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_request_is_accepted_durably_and_delivered() {
    let mut env = TestEnv::start().await;
    let (traceparent, trace_id) = new_traceparent();
    let openid = "oRestUser00000000000000001xy";
    let response = env
        .post_message(
            &demo_request_json(openid, "R-7").to_string(),
            &[("traceparent", &traceparent)],
        )
        .await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.expect("JSON");
    let message_id = accepted["id"].as_str().expect("id").to_string();

    env.wait_for_status(&message_id, DeliveryState::Delivered)
        .await;
    assert_delivered_once(&env, &message_id, openid, "R-7", &trace_id).await;
    // A status event reaches a consumer before the broker confirms it to the relay (the
    // confirm waits for every queue it was routed to, the quorum `webhooks` queue among them),
    // so the relay's delete may trail the event by a moment.
    let db = env.db().await;
    let deadline = std::time::Instant::now() + herald_e2e::WAIT;
    let outbox = loop {
        let outbox: i64 = db
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .expect("count")
            .get(0);
        if outbox == 0 || std::time::Instant::now() > deadline {
            break outbox;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(outbox, 0, "the outbox is drained once the broker confirmed");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_amqp_messages_are_dead_lettered_and_consuming_goes_on() {
    let mut env = TestEnv::start().await;

    env.publish_request(b"{not json", Some("guest"), None).await;
    let dead = env.next_dead_letter().await;
    let table = dead.properties.headers().clone();
    assert_eq!(
        herald_amqp::header_str(table.as_ref(), headers::DEAD_REASON),
        Some("decode_error")
    );
    assert_eq!(dead.data, b"{not json", "the body is parked as it was");
    assert_eq!(
        herald_amqp::header_str(table.as_ref(), headers::DEAD_QUEUE),
        Some(env.broker.topology().render_queue().as_str())
    );

    let missing = uuid::Uuid::now_v7().to_string();
    let mut request = demo_request_json(demo::OPENID, "M-1");
    request["id"] = Value::String(missing.clone());
    request["template"]["id"] = Value::String("no_such_template".into());
    env.publish_request(request.to_string().as_bytes(), Some("guest"), None)
        .await;
    let dead = env.next_dead_letter().await;
    let table = dead.properties.headers().clone();
    assert_eq!(
        herald_amqp::header_str(table.as_ref(), headers::DEAD_REASON),
        Some("rejected")
    );
    let detail = herald_amqp::header_str(table.as_ref(), headers::DEAD_DETAIL).unwrap_or_default();
    assert!(
        detail.starts_with("template.id:") && detail.contains("no_such_template"),
        "{detail}"
    );
    let view = env.get_message(&missing).await;
    assert_eq!(view["state"], "rejected");

    // No user_id: the tenant cannot be known, so the message is parked, not guessed.
    env.publish_request(
        demo_request_json(demo::OPENID, "U-1")
            .to_string()
            .as_bytes(),
        None,
        None,
    )
    .await;
    let dead = env.next_dead_letter().await;
    assert_eq!(
        herald_amqp::header_str(dead.properties.headers().as_ref(), headers::DEAD_REASON),
        Some("unauthenticated")
    );

    // The renderer is still consuming.
    let good = uuid::Uuid::now_v7().to_string();
    let mut request = demo_request_json(demo::OPENID, "G-1");
    request["id"] = Value::String(good.clone());
    env.publish_request(request.to_string().as_bytes(), Some("guest"), None)
        .await;
    env.wait_for_status(&good, DeliveryState::Delivered).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_of_no_tenant_is_parked_with_its_user_and_herald_keeps_publishing() {
    let mut env = TestEnv::start().await;
    let stranger = herald_e2e::RabbitUser::create();
    let mut settings = env.stack.config.amqp.clone();
    settings.url = stranger.url();
    let producer = herald_amqp::Broker::connect(&settings, "stranger")
        .await
        .expect("connect as stranger");
    let properties = herald_amqp::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_user_id(stranger.name.as_str().into());
    let body = demo_request_json(demo::OPENID, "S-1").to_string();
    producer
        .publisher()
        .publish(
            &env.broker.topology().requests_exchange(),
            "request.x",
            body.as_bytes(),
            properties,
        )
        .await
        .expect("RabbitMQ accepts a user_id equal to the connection's user");
    producer.close().await;

    // Herald cannot republish someone else's user_id; it parks the message with it as a header.
    let dead = env.next_dead_letter().await;
    let table = dead.properties.headers().clone();
    assert_eq!(
        herald_amqp::header_str(table.as_ref(), headers::DEAD_REASON),
        Some("unknown_tenant")
    );
    assert_eq!(
        herald_amqp::header_str(table.as_ref(), headers::ORIGINAL_USER),
        Some(stranger.name.as_str())
    );
    assert_eq!(dead.properties.user_id(), &None);

    // And the renderer's publishing still works.
    let id = env.send_demo(demo::OPENID, "S-2").await;
    env.wait_for_status(&id, DeliveryState::Delivered).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rest_requests_are_refused_and_nothing_is_published() {
    let env = TestEnv::start().await;
    let cases = [
        ("{", "body"),
        (r#"{"recipients":[{"wechatOpenid":"o"}]}"#, "template.id"),
        (
            r#"{"template":{"id":"order_shipped"},"recipients":[]}"#,
            "recipients",
        ),
        (
            r#"{"template":{"id":"order_shipped"},"recipients":[{"email":5}]}"#,
            "recipients[0].email",
        ),
        (
            r#"{"template":{"id":"order_shipped"},"recipients":[{"wechatOpenid":"o"}],"channels":["fax"]}"#,
            "channels[0]",
        ),
        (
            r#"{"template":{"id":"order_shipped"},"recipients":[{"wechatOpenid":"o"}],"priority":"SOON"}"#,
            "priority",
        ),
    ];
    for (body, field) in cases {
        let response = env.post_message(body, &[]).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.expect("JSON error");
        assert_eq!(error["error"], "invalid_request");
        assert_eq!(error["field"], field, "{body}: {error}");
    }
    let good = demo_request_json(demo::OPENID, "K-1").to_string();
    let url = format!("{}/v1/messages", env.stack.ingress_url);
    let no_key = env
        .http
        .post(&url)
        .body(good.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(no_key.status(), 401);
    let wrong_key = env
        .http
        .post(&url)
        .bearer_auth("hk_wrong")
        .body(good)
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong_key.status(), 401);

    // Over the default 2 MiB body limit.
    let huge = format!(
        r#"{{"template":{{"id":"{}"}}}}"#,
        "x".repeat(3 * 1024 * 1024)
    );
    let too_large = env.post_message(&huge, &[]).await;
    assert_eq!(too_large.status(), 413);
    let error: Value = too_large
        .json()
        .await
        .expect("a JSON error, like every other");
    assert_eq!(error["error"], "invalid_body");

    let db = env.db().await;
    let messages: i64 = db
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .expect("count")
        .get(0);
    let outbox: i64 = db
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        (messages, outbox),
        (0, 0),
        "nothing was accepted or queued for publishing"
    );
    assert!(
        env.stack
            .sandbox
            .requests()
            .iter()
            .all(|r| r.path != paths::TEMPLATE_SEND)
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_replays_the_original_and_refuses_a_different_body() {
    let mut env = TestEnv::start().await;
    let body = demo_request_json(demo::OPENID, "I-1").to_string();
    let first = env
        .post_message(&body, &[("idempotency-key", "order-I-1")])
        .await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.expect("JSON");
    let replay = env
        .post_message(&body, &[("idempotency-key", "order-I-1")])
        .await;
    assert_eq!(replay.status(), 202);
    assert_eq!(
        replay
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let replay: Value = replay.json().await.expect("JSON");
    assert_eq!(first["id"], replay["id"]);
    let other = demo_request_json(demo::OPENID, "I-2").to_string();
    let conflict = env
        .post_message(&other, &[("idempotency-key", "order-I-1")])
        .await;
    assert_eq!(conflict.status(), 409);

    let id = first["id"].as_str().expect("id").to_string();
    env.wait_for_status(&id, DeliveryState::Delivered).await;
    let sends = env
        .stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path == paths::TEMPLATE_SEND)
        .count();
    assert_eq!(sends, 1, "a replayed request is not sent again");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_do_not_see_each_others_messages() {
    let (mut a, mut b) = tokio::join!(TestEnv::start(), TestEnv::start());
    let (openid_a, openid_b) = (
        "oRunA000000000000000000001xy",
        "oRunB000000000000000000001xy",
    );
    let ra = a
        .post_message(&demo_request_json(openid_a, "A").to_string(), &[])
        .await;
    let rb = b
        .post_message(&demo_request_json(openid_b, "B").to_string(), &[])
        .await;
    let id_a = ra.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let id_b = rb.json::<Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("id")
        .to_string();
    a.wait_for_status(&id_a, DeliveryState::Delivered).await;
    b.wait_for_status(&id_b, DeliveryState::Delivered).await;

    for (env, mine, theirs) in [(&a, openid_a, openid_b), (&b, openid_b, openid_a)] {
        let touched: Vec<String> = env
            .stack
            .sandbox
            .requests()
            .iter()
            .filter(|r| r.path == paths::TEMPLATE_SEND)
            .filter_map(|r| r.body["touser"].as_str().map(str::to_string))
            .collect();
        assert_eq!(
            touched,
            [mine],
            "{} saw only its own send, not {theirs}",
            env.id
        );
        let rows: i64 = env
            .db()
            .await
            .query_one("SELECT count(*) FROM messages", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(rows, 1);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_reuse_of_an_idempotency_key_by_another_request_is_parked_not_dropped() {
    let mut env = TestEnv::start().await;
    let mut first = demo_request_json(demo::OPENID, "IK-1");
    first["idempotencyKey"] = Value::String("order-IK".into());
    let first_id = uuid::Uuid::now_v7().to_string();
    first["id"] = Value::String(first_id.clone());
    env.publish_request(first.to_string().as_bytes(), Some("guest"), None)
        .await;
    env.wait_for_status(&first_id, DeliveryState::Queued).await;

    // The same bytes again: a producer's retried publish, processed idempotently (no park).
    env.publish_request(first.to_string().as_bytes(), Some("guest"), None)
        .await;
    // Another request under the same key: parked with the reason, never silently dropped.
    let mut other = demo_request_json(demo::OPENID, "IK-2");
    other["idempotencyKey"] = Value::String("order-IK".into());
    other["id"] = Value::String(uuid::Uuid::now_v7().to_string());
    env.publish_request(other.to_string().as_bytes(), Some("guest"), None)
        .await;
    let dead = env.next_dead_letter().await;
    let table = dead.properties.headers().clone();
    assert_eq!(
        herald_amqp::header_str(table.as_ref(), headers::DEAD_REASON),
        Some("idempotency_conflict")
    );
    assert_eq!(dead.data, other.to_string().as_bytes());
    let view = env.get_message(&first_id).await;
    assert_eq!(view["deliveries"].as_array().map(Vec::len), Some(1));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_another_schema_version_is_parked_not_read_as_this_one() {
    let env = TestEnv::start().await;
    let body = demo_request_json(demo::OPENID, "S-2").to_string();
    let mut table = herald_amqp::FieldTable::default();
    table.insert(
        headers::SCHEMA_VERSION.into(),
        herald_amqp::AMQPValue::LongString("herald.v2".into()),
    );
    let properties = herald_amqp::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_user_id("guest".into())
        .with_headers(table);
    env.broker
        .publisher()
        .publish(
            &env.broker.topology().requests_exchange(),
            "request.test",
            body.as_bytes(),
            properties,
        )
        .await
        .expect("publish confirmed");
    let dead = env.next_dead_letter().await;
    let table = dead.properties.headers().clone();
    assert_eq!(
        herald_amqp::header_str(table.as_ref(), headers::DEAD_REASON),
        Some("unsupported_schema")
    );
    let detail = herald_amqp::header_str(table.as_ref(), headers::DEAD_DETAIL).unwrap_or_default();
    assert!(detail.contains("herald.v2"), "{detail}");
    assert_eq!(dead.data, body.as_bytes(), "the body is parked as it was");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp_request_failing_the_rest_checks_is_rejected_naming_the_field() {
    let env = TestEnv::start().await;
    let id = uuid::Uuid::now_v7().to_string();
    let mut request = demo_request_json(demo::OPENID, "V-1");
    request["id"] = Value::String(id.clone());
    request["channels"] = serde_json::json!(["wechat.template", "fax"]);
    env.publish_request(request.to_string().as_bytes(), Some("guest"), None)
        .await;
    let dead = env.next_dead_letter().await;
    let table = dead.properties.headers().clone();
    assert_eq!(
        herald_amqp::header_str(table.as_ref(), headers::DEAD_REASON),
        Some("rejected")
    );
    let detail = herald_amqp::header_str(table.as_ref(), headers::DEAD_DETAIL).unwrap_or_default();
    assert!(
        detail.starts_with("channels[1]:") && detail.contains("fax"),
        "{detail}"
    );
    let view = env.get_message(&id).await;
    assert_eq!(view["state"], "rejected");

    // Year 10000 in UTC: stored, then rejected (its stored form could not be read back).
    let id = uuid::Uuid::now_v7().to_string();
    let mut request = demo_request_json(demo::OPENID, "V-2");
    request["id"] = Value::String(id.clone());
    request["sendAt"] = Value::String("9999-12-31T23:30:00-01:00".into());
    env.publish_request(request.to_string().as_bytes(), Some("guest"), None)
        .await;
    let dead = env.next_dead_letter().await;
    let detail = herald_amqp::header_str(dead.properties.headers().as_ref(), headers::DEAD_DETAIL)
        .unwrap_or_default();
    assert!(detail.starts_with("send_at:"), "{detail}");
    let view = env.get_message(&id).await;
    assert_eq!(view["state"], "rejected");
    env.stop().await;
}
