//! Provider callbacks and the status lifecycle against the real stack: the official crypto
//! vectors through the receiver, replays and duplicates, events before their send result,
//! failures, follow state and suppression, bursts, the status API and status webhooks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use herald_contract::decode_json;
use herald_contract::v1::{DeliveryState, StatusEvent};
use herald_e2e::{TestEnv, WAIT, demo};
use herald_sandbox::{CallbackMode, SandboxApp};
use herald_store::{NewDelivery, NewMessage, Outcome, Store};
use serde_json::{Value, json};
use sha1::Digest as _;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------
// Helpers. Signatures and HMACs are computed here independently of Herald's own code.

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/crypto.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("vectors")).expect("vectors parse")
}

fn sha1_hex(parts: &[&str]) -> String {
    let mut parts = parts.to_vec();
    parts.sort_unstable();
    hex::encode(sha1::Sha1::digest(parts.concat().as_bytes()))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A plain-mode query signed with `token` at `timestamp`.
fn plain_query(token: &str, timestamp: i64) -> Vec<(String, String)> {
    let (timestamp, nonce) = (timestamp.to_string(), Uuid::new_v4().simple().to_string());
    vec![
        ("signature".into(), sha1_hex(&[token, &timestamp, &nonce])),
        ("timestamp".into(), timestamp),
        ("nonce".into(), nonce),
        ("openid".into(), demo::OPENID.into()),
    ]
}

fn demo_token() -> String {
    SandboxApp::demo().callback_token
}

fn job_finish(openid: &str, msgid: &str, status: &str, create_time: i64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_demo00000001]]></ToUserName>\
         <FromUserName><![CDATA[{openid}]]></FromUserName><CreateTime>{create_time}</CreateTime>\
         <MsgType><![CDATA[event]]></MsgType><Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event>\
         <MsgID>{msgid}</MsgID><Status><![CDATA[{status}]]></Status></xml>"
    )
}

fn follow_event(openid: &str, event: &str, create_time: i64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_demo00000001]]></ToUserName>\
         <FromUserName><![CDATA[{openid}]]></FromUserName><CreateTime>{create_time}</CreateTime>\
         <MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event>\
         <EventKey><![CDATA[]]></EventKey></xml>"
    )
}

async fn post(
    env: &TestEnv,
    path: &str,
    query: &[(String, String)],
    body: impl Into<reqwest::Body>,
) -> (u16, String) {
    let response = env
        .http
        .post(format!("{}{path}", env.stack.callback_url))
        .query(query)
        .body(body)
        .send()
        .await
        .expect("receiver answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn get(env: &TestEnv, path: &str, query: &[(String, String)]) -> (u16, String) {
    let response = env
        .http
        .get(format!("{}{path}", env.stack.callback_url))
        .query(query)
        .send()
        .await
        .expect("receiver answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// Posts a plain-mode TEMPLATESENDJOBFINISH for the demo account, as WeChat would.
async fn post_job_finish(env: &TestEnv, openid: &str, msgid: &str, status: &str) -> (u16, String) {
    post(
        env,
        "/v1/callbacks/wechat/demo-oa",
        &plain_query(&demo_token(), now()),
        job_finish(openid, msgid, status, now()),
    )
    .await
}

async fn store(env: &TestEnv) -> Store {
    Store::connect(
        &env.stack.config.postgres,
        &env.broker.topology().status_exchange(),
    )
    .await
    .expect("test store")
}

/// Waits for a condition that has no event of its own (a row the projector writes).
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn count(
    env: &TestEnv,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    env.db()
        .await
        .query_one(sql, params)
        .await
        .expect("count query")
        .get(0)
}

/// The provider msgid of the (only) delivery of a message.
async fn msgid_of(env: &TestEnv, message_id: &str) -> String {
    env.get_message(message_id).await["deliveries"][0]["provider_msgid"]
        .as_str()
        .expect("provider msgid stored")
        .to_string()
}

/// A message of the demo tenant with one delivery per recipient, created through the store
/// as the renderer would; answers (message id, delivery ids).
async fn make_deliveries(store: &Store, recipients: &[String]) -> (Uuid, Vec<Uuid>) {
    let message = Uuid::now_v7();
    store
        .ensure_message(NewMessage {
            id: message,
            tenant_id: demo::TENANT.into(),
            template_id: demo::TEMPLATE.into(),
            idempotency_key: None,
            request: "{}".into(),
            request_hash: message.as_bytes().to_vec(),
            source: "amqp",
            traceparent: None,
        })
        .await
        .expect("message");
    let rows: Vec<NewDelivery> = recipients
        .iter()
        .enumerate()
        .map(|(i, recipient)| NewDelivery {
            id: Uuid::new_v5(&message, i.to_string().as_bytes()),
            channel: "wechat.template".into(),
            provider_account: demo::ACCOUNT.into(),
            recipient: recipient.clone(),
        })
        .collect();
    store
        .create_deliveries(message, demo::TENANT, &rows)
        .await
        .expect("deliveries");
    (message, rows.into_iter().map(|r| r.id).collect())
}

fn status_of(delivery: &herald_amqp::Delivery) -> StatusEvent {
    decode_json(&delivery.data).expect("status event")
}

// ---------------------------------------------------------------------------------------
// Crypto vectors through the receiver, and what it refuses.

fn vector_accounts(config: &mut heraldctl::HeraldConfig) {
    let v = vectors();
    let oa = &v["wechat_safe_mode"][1];
    let mp = &v["wechat_safe_mode"][0];
    let wecom = &v["wecom_callback"][0];
    let account = |x: &Value, appid: &str| herald_callback::WechatCallbackAccount {
        token: x["token"].as_str().expect("token").into(),
        appid: appid.into(),
        encoding_aes_key: Some(x["encoding_aes_key"].as_str().expect("key").into()),
    };
    config.callback.wechat.insert(
        "vec-oa".into(),
        account(oa, oa["appid"].as_str().expect("appid")),
    );
    config.callback.wechat.insert(
        "vec-mp".into(),
        account(mp, mp["appid"].as_str().expect("appid")),
    );
    // Same token and key, another appid: its messages are not this account's.
    config
        .callback
        .wechat
        .insert("vec-other".into(), account(oa, "wx0000000000000000"));
    config.callback.wecom.insert(
        "vec-wecom".into(),
        herald_callback::WecomCallbackAccount {
            token: wecom["token"].as_str().expect("token").into(),
            corpid: wecom["corpid"].as_str().expect("corpid").into(),
            encoding_aes_key: wecom["encoding_aes_key"].as_str().expect("key").into(),
        },
    );
    // The official examples are from 2014 and 2024.
    config.callback.timestamp_window_secs = 100 * 365 * 24 * 3600;
    config.callback.max_body_bytes = 8 * 1024;
}

fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_vectors_pass_through_the_receiver_and_forgeries_do_not() {
    let env = TestEnv::start_with(vector_accounts).await;
    let v = vectors();

    // Official Account, safe mode, XML (a text message: acknowledged, nothing to act on).
    let oa = &v["wechat_safe_mode"][1];
    let s = |x: &Value, k: &str| x[k].as_str().expect(k).to_string();
    let (ts, nonce, encrypt) = (s(oa, "timestamp"), s(oa, "nonce"), s(oa, "encrypt"));
    let url_signature = sha1_hex(&[&s(oa, "token"), &ts, &nonce]);
    let safe_query = |msg_signature: &str| {
        q(&[
            ("signature", &url_signature),
            ("timestamp", &ts),
            ("nonce", &nonce),
            ("openid", "oyORnuP8q7ou2gfYjqLzSIWZf0rs"),
            ("encrypt_type", "aes"),
            ("msg_signature", msg_signature),
        ])
    };
    let body = format!(
        "<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    );
    let good = s(oa, "msg_signature");
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/vec-oa",
            &safe_query(&good),
            body.clone()
        )
        .await,
        (200, "success".into())
    );
    // A tampered msg_signature, a ciphertext for another appid, no EncodingAESKey.
    let mut bad = good.clone();
    bad.replace_range(39.., if good.ends_with('a') { "b" } else { "a" });
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/vec-oa",
            &safe_query(&bad),
            body.clone()
        )
        .await,
        (403, "msg_signature mismatch".into())
    );
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/vec-other",
            &safe_query(&good),
            body.clone()
        )
        .await,
        (403, "appid mismatch".into())
    );
    let mut no_key_query = safe_query(&good);
    no_key_query[0].1 = sha1_hex(&[&demo_token(), &ts, &nonce]);
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/demo-oa",
            &no_key_query,
            body.clone()
        )
        .await
        .0,
        501
    );
    // Compatible mode: plaintext and Encrypt; only the encrypted part is authenticated and used,
    // so a bad msg_signature is refused whatever the plaintext says.
    let compatible = format!(
        "<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName><MsgType>event</MsgType>\
         <Event>TEMPLATESENDJOBFINISH</Event><MsgID>1</MsgID><Status>success</Status>\
         <Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    );
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/vec-oa",
            &safe_query(&good),
            compatible.clone()
        )
        .await,
        (200, "success".into())
    );
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/vec-oa",
            &safe_query(&bad),
            compatible
        )
        .await
        .0,
        403
    );

    // Mini-program style JSON safe mode (an unknown debug event: acknowledged).
    let mp = &v["wechat_safe_mode"][0];
    let query = q(&[
        ("signature", &s(mp, "url_signature")),
        ("timestamp", &s(mp, "timestamp")),
        ("nonce", &s(mp, "nonce")),
        ("encrypt_type", "aes"),
        ("msg_signature", &s(mp, "msg_signature")),
    ]);
    let json_body =
        json!({"ToUserName": "gh_97417a04a28d", "Encrypt": s(mp, "encrypt")}).to_string();
    assert_eq!(
        post(&env, "/v1/callbacks/wechat/vec-mp", &query, json_body).await,
        (200, "success".into())
    );

    // Plain URL verification (vector with an echostr) and a wrong signature.
    let plain = &v["wechat_url_signature"][0];
    let mut verify = q(&[
        ("signature", &s(plain, "signature")),
        ("timestamp", &s(plain, "timestamp")),
        ("nonce", &s(plain, "nonce")),
        ("echostr", &s(plain, "echostr")),
    ]);
    // The vector's token is "AAAAA", which is vec-mp's token.
    assert_eq!(
        get(&env, "/v1/callbacks/wechat/vec-mp", &verify).await,
        (200, s(plain, "echostr"))
    );
    verify[0].1 = s(&v["wechat_url_signature"][1], "must_reject_signature");
    assert_eq!(
        get(&env, "/v1/callbacks/wechat/vec-mp", &verify).await.0,
        403
    );

    // WeCom: URL verification answers the decrypted echostr; POST decrypts with the corpid.
    let wecom = &v["wecom_callback"][0];
    let vu = &wecom["verify_url"];
    let verify = q(&[
        ("msg_signature", &s(vu, "msg_signature")),
        ("timestamp", &s(vu, "timestamp")),
        ("nonce", &s(vu, "nonce")),
        ("echostr", &s(vu, "echostr")),
    ]);
    assert_eq!(
        get(&env, "/v1/callbacks/wecom/vec-wecom", &verify).await,
        (200, s(vu, "echostr_plaintext"))
    );
    let vp = &wecom["post"];
    let query = q(&[
        ("msg_signature", &s(vp, "msg_signature")),
        ("timestamp", &s(vp, "timestamp")),
        ("nonce", &s(vp, "nonce")),
    ]);
    let body = format!(
        "<xml><ToUserName><![CDATA[{}]]></ToUserName><Encrypt><![CDATA[{}]]></Encrypt><AgentID><![CDATA[218]]></AgentID></xml>",
        s(wecom, "corpid"),
        s(vp, "encrypt")
    );
    assert_eq!(
        post(&env, "/v1/callbacks/wecom/vec-wecom", &query, body.clone()).await,
        (200, String::new())
    );
    let mut forged = query.clone();
    forged[0].1 = sha1_hex(&["attacker", "1", "2"]);
    assert_eq!(
        post(&env, "/v1/callbacks/wecom/vec-wecom", &forged, body)
            .await
            .0,
        403
    );

    // Body size limit, DTDs, unknown accounts.
    let huge = "x".repeat(16 * 1024);
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/demo-oa",
            &plain_query(&demo_token(), now()),
            huge
        )
        .await
        .0,
        413
    );
    let dtd = r#"<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY x SYSTEM "file:///etc/passwd">]><xml><MsgType>&x;</MsgType></xml>"#;
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/demo-oa",
            &plain_query(&demo_token(), now()),
            dtd
        )
        .await
        .0,
        400
    );
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/nobody",
            &plain_query(&demo_token(), now()),
            "<xml/>"
        )
        .await
        .0,
        404
    );
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// Replays, duplicates, ordering.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_rejected_and_a_callback_sent_three_times_is_applied_once() {
    // One event at a time through the projector, so "after B" means "after A's copies".
    let mut env = TestEnv::start_with(|config| config.amqp.prefetch = 1).await;
    env.stack.sandbox.set_callback_url(demo::APPID, None);
    let a = env.send_demo("oReplayUserA00000000000001", "R-1").await;
    let b = env.send_demo("oReplayUserB00000000000001", "R-2").await;
    env.wait_for_statuses(&[a.clone(), b.clone()], DeliveryState::Sent, WAIT)
        .await;
    let (msgid_a, msgid_b) = (msgid_of(&env, &a).await, msgid_of(&env, &b).await);

    // Stale timestamp (a captured callback replayed an hour later) and a bad signature.
    let stale = plain_query(&demo_token(), now() - 3600);
    let body = job_finish(
        "oReplayUserA00000000000001",
        &msgid_a,
        "success",
        now() - 3600,
    );
    assert_eq!(
        post(&env, "/v1/callbacks/wechat/demo-oa", &stale, body.clone()).await,
        (403, "stale timestamp".into())
    );
    let mut forged = plain_query(&demo_token(), now());
    forged[0].1 = sha1_hex(&["not-the-token", &forged[1].1, &forged[2].1]);
    assert_eq!(
        post(&env, "/v1/callbacks/wechat/demo-oa", &forged, body).await,
        (403, "signature mismatch".into())
    );
    // Refused before anything was published.
    assert_eq!(env.get_message(&a).await["deliveries"][0]["state"], "sent");

    // WeChat retries a callback (3 attempts), each freshly signed; the body is the same.
    let create_time = now();
    let body = job_finish(
        "oReplayUserA00000000000001",
        &msgid_a,
        "success",
        create_time,
    );
    for _ in 0..3 {
        let query = plain_query(&demo_token(), now());
        assert_eq!(
            post(&env, "/v1/callbacks/wechat/demo-oa", &query, body.clone()).await,
            (200, "success".into())
        );
    }
    assert_eq!(
        post_job_finish(&env, "oReplayUserB00000000000001", &msgid_b, "success")
            .await
            .0,
        200
    );
    env.wait_for_statuses(&[a.clone(), b.clone()], DeliveryState::Delivered, WAIT)
        .await;
    let delivered_rows = count(
        &env,
        "SELECT count(*) FROM delivery_events e JOIN deliveries d ON d.id = e.delivery_id
         WHERE d.message_id = $1 AND e.state = 'delivered'",
        &[&Uuid::parse_str(&a).expect("uuid")],
    )
    .await;
    assert_eq!(delivered_rows, 1, "three copies, one application");
    let view = env.get_message(&a).await;
    assert_eq!(view["state"], "delivered");
    assert_eq!(
        view["deliveries"][0]["timeline"].as_array().map(Vec::len),
        Some(4)
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_before_its_send_result_waits_then_applies_and_late_results_change_nothing() {
    let mut env = TestEnv::start().await;
    let store = store(&env).await;
    let (message, deliveries) =
        make_deliveries(&store, &["oEarlyUser0000000000000001".into()]).await;
    let delivery = deliveries[0];
    store.claim_delivery(delivery).await.expect("claim");

    // WeChat is fast: its callback for msgid 424242 arrives before the sender stored it.
    assert_eq!(
        post_job_finish(&env, "oEarlyUser0000000000000001", "424242", "success").await,
        (200, "success".into())
    );
    wait_until("the event to be kept pending", || async {
        count(
            &env,
            "SELECT count(*) FROM pending_provider_events WHERE provider_msgid = '424242'",
            &[],
        )
        .await
            == 1
    })
    .await;
    let state = store
        .record_outcome(
            delivery,
            &Outcome::Sent {
                provider_msgid: "424242".into(),
            },
        )
        .await
        .expect("send result");
    assert_eq!(
        state,
        DeliveryState::Delivered,
        "the waiting event applied with the result"
    );
    env.wait_for_status(&message.to_string(), DeliveryState::Delivered)
        .await;

    // A late `sent` (a redelivered job's result) and a late failure change nothing.
    let late = store
        .record_outcome(
            delivery,
            &Outcome::Sent {
                provider_msgid: "424242".into(),
            },
        )
        .await
        .expect("late result");
    assert_eq!(late, DeliveryState::Delivered);
    let view = env.get_message(&message.to_string()).await;
    let timeline: Vec<&str> = view["deliveries"][0]["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert_eq!(timeline, ["queued", "sending", "sent", "delivered"]);
    assert_eq!(view["deliveries"][0]["provider_msgid"], "424242");
    assert_eq!(
        count(&env, "SELECT count(*) FROM pending_provider_events", &[]).await,
        0
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_never_finds_its_delivery_is_parked_after_the_bound() {
    let env = TestEnv::start_with(|config| {
        config.callback.pending_max_age_secs = 1;
        config.callback.pending_sweep_interval_ms = 200;
    })
    .await;
    assert_eq!(
        post_job_finish(&env, demo::OPENID, "99999999", "success").await,
        (200, "success".into())
    );
    let parked = env.next_dead_letter().await;
    let headers = parked.properties.headers().clone();
    assert_eq!(
        herald_amqp::header_str(headers.as_ref(), "x-herald-dead-reason"),
        Some("unmatched_event")
    );
    let event: Value = serde_json::from_slice(&parked.data).expect("event body");
    assert_eq!(event["providerMsgid"], "99999999");
    assert_eq!(
        count(&env, "SELECT count(*) FROM pending_provider_events", &[]).await,
        0
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_block_fails_the_delivery_with_that_reason() {
    let mut env = TestEnv::start().await;
    let openid = "oBlockedUser00000000000001";
    env.stack
        .sandbox
        .set_callback_status(openid, "failed:user block");
    let id = env.send_demo(openid, "B-1").await;
    let event = env.wait_for_status(&id, DeliveryState::Failed).await;
    assert_eq!(event.error_code, "failed:user block");
    let view = env.get_message(&id).await;
    assert_eq!(view["state"], "failed");
    assert_eq!(
        view["deliveries"][0]["last_error_code"],
        "failed:user block"
    );
    assert_eq!(view["deliveries"][0]["last_error"], "failed:user block");
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// A burst.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_1000_callbacks_from_50_connections_is_answered_in_time_and_all_applied() {
    const TOTAL: usize = 1000;
    const CONNECTIONS: usize = 50;
    let env = TestEnv::start().await;
    let store = store(&env).await;
    let recipients: Vec<String> = (0..TOTAL).map(|i| format!("oBurstUser{i:016}")).collect();
    // Fifty messages of twenty recipients: a message's state aggregates its deliveries, so
    // one message of a thousand would make every event read a thousand rows.
    let mut messages = Vec::new();
    let mut deliveries = Vec::new();
    for chunk in recipients.chunks(TOTAL / CONNECTIONS) {
        let (message, ids) = make_deliveries(&store, chunk).await;
        messages.push(message);
        deliveries.extend(ids);
    }
    let msgids: Vec<String> = (0..TOTAL).map(|i| format!("7{i:09}")).collect();
    env.db()
        .await
        .execute(
            "UPDATE deliveries d SET state = 'sent', attempt = 1, provider_msgid = m.msgid
             FROM unnest($1::uuid[], $2::text[]) AS m(id, msgid) WHERE d.id = m.id",
            &[&deliveries, &msgids],
        )
        .await
        .expect("deliveries sent");
    let mut delivered = env
        .broker
        .subscribe_temporary(
            &env.broker.topology().status_exchange(),
            "status.demo.delivered",
        )
        .await
        .expect("subscribe");

    let jobs: Vec<(String, String)> = recipients.into_iter().zip(msgids).collect();
    let jobs = Arc::new(Mutex::new(jobs));
    let url = format!("{}/v1/callbacks/wechat/demo-oa", env.stack.callback_url);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (jobs, url) = (jobs.clone(), url.clone());
        // One client per connection: keep-alive keeps each on its own connection.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .expect("client");
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some((openid, msgid)) = jobs.lock().expect("jobs").pop() else {
                    return latencies;
                };
                let body = job_finish(&openid, &msgid, "success", now());
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .query(&plain_query(&demo_token(), now()))
                    .body(body)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .expect("answered within WeChat's 5 s");
                let status = response.status();
                let text = response.text().await.expect("body");
                latencies.push(sent.elapsed());
                assert_eq!((status.as_u16(), text.as_str()), (200, "success"));
            }
        });
    }
    let mut latencies = Vec::with_capacity(TOTAL);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.expect("connection task"));
    }
    let burst = started.elapsed();
    assert_eq!(latencies.len(), TOTAL);
    latencies.sort();
    let max = latencies[TOTAL - 1];
    println!(
        "burst of {TOTAL} callbacks over {CONNECTIONS} connections: {burst:?} in all; \
         latency p50 {:?}, p99 {:?}, max {max:?}",
        latencies[TOTAL / 2],
        latencies[TOTAL * 99 / 100]
    );
    assert!(max < Duration::from_secs(5), "max latency {max:?}");

    // Every callback applied: one delivered status per delivery.
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while seen.len() < TOTAL {
        let next = tokio::time::timeout_at(deadline, delivered.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {TOTAL} delivered", seen.len()))
            .expect("subscription open")
            .expect("delivery");
        let event = status_of(&next);
        if messages.iter().any(|m| event.message_id == m.to_string()) {
            seen.insert(event.delivery_id);
        }
    }
    let applied = count(
        &env,
        "SELECT count(*) FROM deliveries WHERE message_id = ANY($1) AND state = 'delivered'",
        &[&messages],
    )
    .await;
    assert_eq!(applied, TOTAL as i64);
    println!(
        "all {TOTAL} applied {:?} after the burst began",
        started.elapsed()
    );
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// Follow state (safe mode, from the sandbox) and suppression.

const SAFE_KEY: &str = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR";

fn safe_mode(config: &mut heraldctl::HeraldConfig) {
    let mut app = SandboxApp::demo();
    app.callback_mode = CallbackMode::Safe;
    app.encoding_aes_key = Some(SAFE_KEY.into());
    config.sandbox.apps = vec![app];
    config.callback.wechat.insert(
        demo::ACCOUNT.into(),
        herald_callback::WechatCallbackAccount {
            token: demo_token(),
            appid: demo::APPID.into(),
            encoding_aes_key: Some(SAFE_KEY.into()),
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_suppresses_the_next_request_and_subscribe_lifts_it() {
    let mut env = TestEnv::start_with(safe_mode).await;
    let openid = "oLeavingUser00000000000001";
    // A send in safe mode: the sandbox's encrypted TEMPLATESENDJOBFINISH settles it.
    let first = env.send_demo(openid, "U-1").await;
    env.wait_for_status(&first, DeliveryState::Delivered).await;
    let callback = env.stack.sandbox.callbacks().pop().expect("a callback");
    assert!(callback.url.contains("encrypt_type=aes") && callback.url.contains("msg_signature="));
    assert!(
        callback.body.contains("<Encrypt>") && !callback.body.contains("TEMPLATESENDJOBFINISH")
    );

    // The user unfollows; WeChat delivers the event three times.
    let left_at = now() - 10;
    for _ in 0..3 {
        let attempt = env
            .stack
            .sandbox
            .post_callback(
                demo::APPID,
                openid,
                &follow_event(openid, "unsubscribe", left_at),
            )
            .await
            .expect("callback URL");
        assert_eq!(attempt.status, Some(200));
        assert!(attempt.accepted, "{attempt:?}");
    }
    let store = store(&env).await;
    wait_until("the unsubscribe to be applied", || async {
        store
            .follow_state(demo::ACCOUNT, openid)
            .await
            .expect("follow state")
            .is_some_and(|f| !f.following)
    })
    .await;

    // The next request to that openid is not sent: suppressed, with the reason.
    let sends_before = env.stack.sandbox.requests().len();
    let second = env.send_demo(openid, "U-2").await;
    let event = env
        .wait_for_status(&second, DeliveryState::Suppressed)
        .await;
    assert_eq!(event.error_code, "unsubscribed");
    let view = env.get_message(&second).await;
    assert_eq!(view["state"], "suppressed");
    assert_eq!(view["deliveries"][0]["state"], "suppressed");
    assert_eq!(view["deliveries"][0]["last_error_code"], "unsubscribed");
    assert_eq!(view["deliveries"][0]["timeline"][0]["state"], "suppressed");
    assert_eq!(
        view["deliveries"][0]["timeline"][0]["detail"]["reason"],
        "unsubscribed"
    );
    assert!(
        env.stack.sandbox.requests()[sends_before..]
            .iter()
            .all(|r| r.body["touser"] != openid),
        "nothing was sent to the unsubscribed user"
    );

    // An older event arriving late changes nothing; following again lifts the suppression.
    let stale = follow_event(openid, "subscribe", left_at - 100);
    env.stack
        .sandbox
        .post_callback(demo::APPID, openid, &stale)
        .await;
    let back = follow_event(openid, "subscribe", now());
    env.stack
        .sandbox
        .post_callback(demo::APPID, openid, &back)
        .await;
    wait_until("the subscribe to be applied", || async {
        store
            .follow_state(demo::ACCOUNT, openid)
            .await
            .expect("follow state")
            .is_some_and(|f| f.following)
    })
    .await;
    let third = env.send_demo(openid, "U-3").await;
    env.wait_for_status(&third, DeliveryState::Delivered).await;
    let unsubscribes = count(
        &env,
        "SELECT count(*) FROM recipient_events WHERE recipient = $1 AND kind = 'unsubscribe'",
        &[&openid],
    )
    .await;
    assert_eq!(unsubscribes, 1, "three copies of the event, recorded once");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressing_a_redelivered_request_moves_only_deliveries_still_queued() {
    let env = TestEnv::start().await;
    let store = store(&env).await;
    let recipients = [
        "oQueuedUser000000000000001".to_string(),
        "oSentUser00000000000000001".to_string(),
    ];
    let (message, deliveries) = make_deliveries(&store, &recipients).await;
    store.claim_delivery(deliveries[1]).await.expect("claim");
    store
        .record_outcome(
            deliveries[1],
            &Outcome::Sent {
                provider_msgid: "55".into(),
            },
        )
        .await
        .expect("sent");
    // The renderer crashed after creating the rows; the request comes back after both
    // recipients unfollowed.
    let rows: Vec<NewDelivery> = recipients
        .iter()
        .zip(&deliveries)
        .map(|(recipient, id)| NewDelivery {
            id: *id,
            channel: "wechat.template".into(),
            provider_account: demo::ACCOUNT.into(),
            recipient: recipient.clone(),
        })
        .collect();
    for _ in 0..2 {
        store
            .create_suppressed_deliveries(message, demo::TENANT, &rows, "unsubscribed", "gone")
            .await
            .expect("suppress");
    }
    let view = env.get_message(&message.to_string()).await;
    let state_of = |id: &Uuid| {
        view["deliveries"]
            .as_array()
            .expect("deliveries")
            .iter()
            .find(|d| d["id"] == id.to_string().as_str())
            .expect("delivery shown")
            .clone()
    };
    assert_eq!(state_of(&deliveries[0])["state"], "suppressed");
    assert_eq!(state_of(&deliveries[0])["last_error_code"], "unsubscribed");
    assert_eq!(state_of(&deliveries[1])["state"], "sent");
    let suppressed_rows = count(
        &env,
        "SELECT count(*) FROM delivery_events WHERE delivery_id = $1 AND state = 'suppressed'",
        &[&deliveries[0]],
    )
    .await;
    assert_eq!(
        suppressed_rows, 1,
        "once, however often the request comes back"
    );
    // A job still in the queue for it finds an outcome and sends nothing.
    assert_eq!(
        store.claim_delivery(deliveries[0]).await.expect("claim"),
        herald_store::Claim::Finished(DeliveryState::Suppressed)
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_events_in_json_are_applied() {
    let mut env = TestEnv::start().await;
    env.stack.sandbox.set_callback_url(demo::APPID, None);
    let id = env.send_demo("oSubscribeMsgUser000000001", "S-1").await;
    env.wait_for_status(&id, DeliveryState::Sent).await;
    let msgid = msgid_of(&env, &id).await;
    let openid = "oSubscribeMsgUser000000001";
    // subscribe_msg_sent_event, JSON, two items: ours (delivered) and an unknown one.
    let sent = json!({
        "ToUserName": "gh_demo00000001", "FromUserName": openid, "CreateTime": now(),
        "MsgType": "event", "Event": "subscribe_msg_sent_event",
        "SubscribeMsgSentEvent": {"List": [
            {"TemplateId": "T1", "MsgID": msgid, "ErrorCode": 0, "ErrorStatus": "success"},
            {"TemplateId": "T2", "MsgID": "123", "ErrorCode": 43101, "ErrorStatus": "failed:user refuse"}
        ]}
    });
    let query = plain_query(&demo_token(), now());
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/demo-oa",
            &query,
            sent.to_string()
        )
        .await,
        (200, "success".into())
    );
    env.wait_for_status(&id, DeliveryState::Delivered).await;
    // subscribe_msg_popup_event, JSON with one List object: stored per template.
    let popup = json!({
        "ToUserName": "gh_demo00000001", "FromUserName": openid, "CreateTime": now(),
        "MsgType": "event", "Event": "subscribe_msg_popup_event",
        "SubscribeMsgPopupEvent": {"List": {"TemplateId": "T9", "SubscribeStatusString": "accept", "PopupScene": "0"}}
    });
    let query = plain_query(&demo_token(), now());
    assert_eq!(
        post(
            &env,
            "/v1/callbacks/wechat/demo-oa",
            &query,
            popup.to_string()
        )
        .await
        .0,
        200
    );
    // An unknown event: acknowledged, not failed.
    let unknown = follow_event(openid, "VIEW", now());
    let query = plain_query(&demo_token(), now());
    assert_eq!(
        post(&env, "/v1/callbacks/wechat/demo-oa", &query, unknown).await,
        (200, "success".into())
    );
    let store = store(&env).await;
    wait_until("the consent to be stored", || async {
        store
            .subscription_consent(demo::ACCOUNT, openid, "T9")
            .await
            .expect("consent")
            .as_deref()
            == Some("accept")
    })
    .await;
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// Producer-facing status: the status exchange, tenant webhooks, the status API.

/// A webhook receiver: answers 500 to the first request, 200 after; hands every request to
/// the test.
struct Hook {
    url: String,
    requests: tokio::sync::mpsc::UnboundedReceiver<(u16, axum::http::HeaderMap, Vec<u8>)>,
}

async fn webhook_receiver(fail_first: bool) -> Hook {
    use axum::routing::post;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (tx, calls) = (tx.clone(), calls.clone());
                async move {
                    let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let status = if fail_first && n == 0 { 500 } else { 200 };
                    let _ = tx.send((status, headers, body.to_vec()));
                    axum::http::StatusCode::from_u16(status).expect("status")
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Hook { url, requests: rx }
}

/// HMAC-SHA256 from its definition (RFC 2104), to check Herald's signatures independently.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::digest([ipad.as_slice(), message].concat());
    Sha256::digest([opad.as_slice(), inner.as_slice()].concat()).to_vec()
}

async fn set_webhook(env: &TestEnv, url: &str) -> String {
    let response = env
        .http
        .put(format!("{}/v1/webhooks/status", env.stack.ingress_url))
        .bearer_auth(demo::API_KEY)
        .json(&json!({ "url": url }))
        .send()
        .await
        .expect("ingress answers");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    body["secret"].as_str().expect("secret").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_get_sent_and_delivered_on_the_exchange_and_signed_by_webhook_with_a_retry() {
    let env = TestEnv::start_with(|config| {
        config.callback.webhooks.allow_private_hosts = vec!["127.0.0.1".into()];
        config.callback.webhooks.initial_backoff_ms = 100;
    })
    .await;
    let mut hook = webhook_receiver(true).await;
    let secret = set_webhook(&env, &hook.url).await;
    assert!(secret.starts_with("whsec_"));
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("secret is base64");
    // GET shows it without the secret.
    let shown: Value = env
        .http
        .get(format!("{}/v1/webhooks/status", env.stack.ingress_url))
        .bearer_auth(demo::API_KEY)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(shown["url"], hook.url.as_str());
    assert!(shown.get("secret").is_none());

    // A producer binds its own queue to its tenant's events before publishing.
    let mut producer = env
        .broker
        .subscribe_temporary(&env.broker.topology().status_exchange(), "status.demo.#")
        .await
        .expect("producer queue");
    let id = env.send_demo(demo::OPENID, "W-1").await;
    let mut on_exchange = Vec::new();
    while !on_exchange.contains(&"delivered".to_string()) {
        let next = tokio::time::timeout(WAIT, producer.next())
            .await
            .expect("status events")
            .expect("open")
            .expect("delivery");
        let event = status_of(&next);
        if event.message_id == id {
            assert_eq!(
                next.routing_key.as_str(),
                format!("status.demo.{}", event.state().name())
            );
            on_exchange.push(event.state().name().to_string());
        }
    }
    assert!(on_exchange.contains(&"sent".to_string()), "{on_exchange:?}");

    // The webhook: every request signed; the first answered 500 and retried with the same id.
    let mut answered: Vec<(u16, String)> = Vec::new();
    let mut delivered_types = std::collections::HashSet::new();
    let retried = |answered: &[(u16, String)]| {
        answered.first().is_some_and(|(status, id)| {
            *status == 500 && answered[1..].iter().any(|(s, i)| *s == 200 && i == id)
        })
    };
    while !(delivered_types.contains("delivery.sent")
        && delivered_types.contains("delivery.delivered")
        && retried(&answered))
    {
        let (status, headers, body) = tokio::time::timeout(WAIT, hook.requests.recv())
            .await
            .expect("webhook requests")
            .expect("receiver open");
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("{name} header"))
                .to_string()
        };
        let (webhook_id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
        let signed = [
            webhook_id.as_bytes(),
            b".",
            timestamp.as_bytes(),
            b".",
            &body,
        ]
        .concat();
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(hmac_sha256(&key, &signed))
        );
        assert!(
            header("webhook-signature")
                .split(' ')
                .any(|s| s == expected),
            "signature verifies"
        );
        let age = now() - timestamp.parse::<i64>().expect("unix seconds");
        assert!((-5..=60).contains(&age), "fresh timestamp");
        let payload: Value = serde_json::from_slice(&body).expect("json payload");
        assert_eq!(payload["data"]["tenant"], "demo");
        if status == 200 && payload["data"]["messageId"] == id.as_str() {
            delivered_types.insert(payload["type"].as_str().unwrap_or_default().to_string());
        }
        answered.push((status, webhook_id));
    }
    assert_eq!(
        answered[0].0, 500,
        "the first request was answered 500: {answered:?}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_to_a_private_address_is_refused_unless_allowed() {
    let env = TestEnv::start().await;
    let mut hook = webhook_receiver(false).await;
    set_webhook(&env, &hook.url).await;
    env.send_demo(demo::OPENID, "SSRF-1").await;
    let parked = env.next_dead_letter().await;
    let headers = parked.properties.headers().clone();
    assert_eq!(
        herald_amqp::header_str(headers.as_ref(), "x-herald-dead-reason"),
        Some("webhook_failed")
    );
    assert!(
        herald_amqp::header_str(headers.as_ref(), "x-herald-dead-detail")
            .is_some_and(|d| d.contains("not a public address")),
        "{headers:?}"
    );
    assert!(
        hook.requests.try_recv().is_err(),
        "no request reached the private address"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_api_finds_messages_by_recipient_with_pages() {
    let mut env = TestEnv::start().await;
    let target = "oLookupUser000000000000001";
    let mut ids = Vec::new();
    for order in ["L-1", "L-2", "L-3"] {
        ids.push(env.send_demo(target, order).await);
    }
    let other = env.send_demo("oSomeoneElse00000000000001", "L-4").await;
    let all: Vec<String> = ids.iter().chain([&other]).cloned().collect();
    env.wait_for_statuses(&all, DeliveryState::Delivered, WAIT)
        .await;
    let list = |query: Vec<(&'static str, String)>| {
        let request = env
            .http
            .get(format!("{}/v1/messages", env.stack.ingress_url))
            .bearer_auth(demo::API_KEY)
            .query(&query);
        async move {
            let response = request.send().await.expect("ingress answers");
            (
                response.status().as_u16(),
                response.json::<Value>().await.expect("json"),
            )
        }
    };
    let (status, page1) = list(vec![("recipient", target.into()), ("limit", "2".into())]).await;
    assert_eq!(status, 200);
    let cursor = page1["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (_, page2) = list(vec![
        ("recipient", target.into()),
        ("limit", "2".into()),
        ("cursor", cursor),
    ])
    .await;
    assert!(page2["next_cursor"].is_null());
    let found: Vec<(chrono::DateTime<chrono::FixedOffset>, String)> = [&page1, &page2]
        .iter()
        .flat_map(|p| p["messages"].as_array().expect("messages").clone())
        .map(|m| {
            assert_eq!(m["deliveries"][0]["recipient"], target);
            assert!(m["deliveries"][0]["provider_msgid"].is_string());
            let created = m["created_at"].as_str().expect("created_at");
            let created = chrono::DateTime::parse_from_rfc3339(created).expect("RFC 3339");
            (created, m["id"].as_str().expect("id").to_string())
        })
        .collect();
    // Every message to the recipient exactly once over the pages, newest first.
    let mut newest_first = found.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(found, newest_first);
    let mut found_ids: Vec<String> = found.into_iter().map(|(_, id)| id).collect();
    found_ids.sort();
    ids.sort();
    assert_eq!(found_ids, ids);

    let (_, by_state) = list(vec![
        ("template", demo::TEMPLATE.into()),
        ("state", "delivered".into()),
        ("since", "2020-01-01T00:00:00Z".into()),
    ])
    .await;
    assert_eq!(by_state["messages"].as_array().map(Vec::len), Some(4));
    let (_, none) = list(vec![("state", "failed".into())]).await;
    assert_eq!(none["messages"].as_array().map(Vec::len), Some(0));
    let (status, bad) = list(vec![("state", "lost".into())]).await;
    assert_eq!((status, bad["field"].as_str()), (400, Some("state")));
    let (status, bad) = list(vec![("cursor", "garbage".into())]).await;
    assert_eq!((status, bad["field"].as_str()), (400, Some("cursor")));
    let (status, bad) = list(vec![("limit", "0".into())]).await;
    assert_eq!((status, bad["field"].as_str()), (400, Some("limit")));

    // Another tenant sees none of it.
    let store = store(&env).await;
    store
        .upsert_tenant("other", "Other", None)
        .await
        .expect("tenant");
    let key = store.create_api_key("other").await.expect("key");
    let theirs: Value = env
        .http
        .get(format!(
            "{}/v1/messages?recipient={target}",
            env.stack.ingress_url
        ))
        .bearer_auth(key)
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert_eq!(theirs["messages"].as_array().map(Vec::len), Some(0));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_webhook_secret_of_ones_own_must_be_whsec_and_long_enough() {
    let env = TestEnv::start().await;
    let put = |secret: &'static str| {
        env.http
            .put(format!("{}/v1/webhooks/status", env.stack.ingress_url))
            .bearer_auth(demo::API_KEY)
            .json(&json!({ "url": "https://hooks.example.com/herald", "secret": secret }))
            .send()
    };
    for bad in [
        "whsec_c2hvcnQ=",                                   // 5 bytes
        "c2VjcmV0LXdpdGhvdXQtdGhlLXByZWZpeC0wMTIzNDU2Nzg5", // no prefix
        "whsec_not base64!",
    ] {
        let response = put(bad).await.expect("ingress answers");
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.expect("json");
        assert!(body.to_string().contains("secret"), "{body}");
    }
    // 32 bytes: accepted as given.
    let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=";
    let response = put(good).await.expect("ingress answers");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["secret"], good);
    env.stop().await;
}
