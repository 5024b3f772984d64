//! Fan-out: one request to 10,000 recipients makes exactly 10,000 delivery jobs, also when the
//! renderer dies halfway and the request is redelivered to another one; more than 10,000 is
//! refused naming the field.

use std::time::Duration;

use futures::StreamExt;

use herald_contract::v1::Priority;
use herald_e2e::{TestEnv, demo, openid};

const RECIPIENTS: usize = 10_000;

/// Polls `query` (one bigint) until `done` holds for its value; answers the value.
async fn poll_count(
    db: &tokio_postgres::Client,
    query: &str,
    id: &str,
    timeout: Duration,
    done: impl Fn(i64) -> bool,
) -> i64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n: i64 = db
            .query_one(query, &[&id])
            .await
            .expect("count query")
            .get(0);
        if done(n) {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{query}` stuck at {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const DELIVERIES: &str = "SELECT count(*) FROM deliveries WHERE message_id = $1::text::uuid";
const JOBS_IN_OUTBOX: &str = "SELECT count(*) FROM outbox WHERE message_id::uuid IN
    (SELECT id FROM deliveries WHERE message_id = $1::text::uuid)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_recipients_make_exactly_ten_thousand_jobs_across_a_renderer_crash() {
    // No sender: the jobs stay in the queue to be counted.
    let env = TestEnv::start_with(|config| {
        config.sender.channels = vec![];
        config.external_renderer = true;
    })
    .await;
    let first = env.stack.spawn_renderer(|config| {
        // Killed rather than drained: whatever it is doing is abandoned unacknowledged.
        config.renderer.drain_timeout_ms = Some(0);
        config.renderer.fanout_batch = 250;
    });
    let openids: Vec<String> = (0..RECIPIENTS).map(openid).collect();
    let id = env.send_demo_to(&openids, Priority::Normal, "F-1").await;
    let db = env.db().await;
    let before_kill = poll_count(&db, DELIVERIES, &id, Duration::from_secs(60), |n| {
        n >= 2_000
    })
    .await;
    first.stop().await.expect("first renderer stops");
    let at_kill: i64 = db
        .query_one(DELIVERIES, &[&id])
        .await
        .expect("count")
        .get(0);
    assert!(
        at_kill < RECIPIENTS as i64,
        "the renderer was stopped mid-fan-out ({before_kill} then {at_kill} deliveries)"
    );

    let second = env.stack.spawn_renderer(|_| {});
    poll_count(&db, DELIVERIES, &id, Duration::from_secs(90), |n| {
        n >= RECIPIENTS as i64
    })
    .await;
    // Every job row relayed (a row leaves the outbox only after the broker's confirm).
    poll_count(&db, JOBS_IN_OUTBOX, &id, Duration::from_secs(60), |n| {
        n == 0
    })
    .await;
    let queue = env
        .broker
        .topology()
        .send_queue(herald_contract::channels::WECHAT_TEMPLATE);
    assert_eq!(
        env.queue_depth(&queue).await,
        RECIPIENTS as u32,
        "exactly one job per recipient"
    );
    let row = db
        .query_one(
            "SELECT count(DISTINCT d.recipient), m.state, m.state_counts->>'queued', fanout_done
             FROM messages m JOIN deliveries d ON d.message_id = m.id
             WHERE m.id = $1::text::uuid GROUP BY m.state, m.state_counts, m.fanout_done",
            &[&id],
        )
        .await
        .expect("message row");
    assert_eq!(row.get::<_, i64>(0), RECIPIENTS as i64);
    assert_eq!(row.get::<_, String>(1), "queued");
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("10000"),
        "the counters saw each delivery once"
    );
    assert_eq!(row.get::<_, i32>(3), RECIPIENTS as i32);
    second.stop().await.expect("second renderer stops");

    // Sends of one large message update its state in O(1) each and lose no count when many
    // run at once: 1,000 claims and outcomes, 16 at a time, as sender workers would.
    let store = herald_store::Store::connect(
        &env.stack.config.postgres,
        &env.broker.topology().status_exchange(),
    )
    .await
    .expect("store");
    let ids: Vec<uuid::Uuid> = db
        .query(
            "SELECT id FROM deliveries WHERE message_id = $1::text::uuid LIMIT 1000",
            &[&id],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let started = std::time::Instant::now();
    futures::stream::iter(ids)
        .for_each_concurrent(16, |delivery| {
            let store = store.clone();
            async move {
                store.claim_delivery(delivery).await.expect("claim");
                store
                    .record_outcome(
                        delivery,
                        &herald_store::Outcome::Sent {
                            provider_msgid: delivery.simple().to_string(),
                        },
                    )
                    .await
                    .expect("outcome");
            }
        })
        .await;
    let took = started.elapsed();
    let counts: serde_json::Value = db
        .query_one(
            "SELECT state_counts FROM messages WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("counts")
        .get(0);
    assert_eq!(
        counts,
        serde_json::json!({"queued": 9_000, "sent": 1_000}),
        "counters agree with the deliveries after concurrent updates"
    );
    assert!(
        took < Duration::from_secs(30),
        "1,000 sends of a 10,000-delivery message took {took:?}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_ten_thousand_recipients_is_a_400_naming_the_field() {
    let env = TestEnv::start().await;
    let recipients: Vec<serde_json::Value> = (0..=RECIPIENTS)
        .map(|n| serde_json::json!({ "wechatOpenid": openid(n) }))
        .collect();
    let mut body = serde_json::json!({
        "template": {"id": demo::TEMPLATE},
        "variables": {"order_id": "F-2", "carrier": "SF Express", "eta": "tomorrow"},
    });
    body["recipients"] = serde_json::Value::Array(recipients);
    let response = env.post_message(&body.to_string(), &[]).await;
    assert_eq!(response.status(), 400);
    let answer: serde_json::Value = response.json().await.expect("JSON error");
    assert_eq!(answer["field"], "recipients", "{answer}");

    // Exactly 10,000 fits the body limit and is accepted.
    if let Some(list) = body["recipients"].as_array_mut() {
        list.pop();
    }
    let response = env.post_message(&body.to_string(), &[]).await;
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    env.stop().await;
}
