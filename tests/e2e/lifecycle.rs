//! The delivery state machine against the real Postgres: monotonic transitions, replay-safe
//! provider events, and a callback that arrives before the send result it reports on.

use herald_contract::v1::{DeliveryEvent, DeliveryState};
use herald_store::{
    Claim, NewDelivery, NewMessage, Outcome, ProviderEventOutcome, Store, StoreSettings,
};
use uuid::Uuid;

struct Db {
    store: Store,
    url: String,
}

async fn fresh_store() -> Db {
    let url = format!(
        "postgres://postgres@127.0.0.1:5432/herald_test_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    herald_store::ensure_database(&url)
        .await
        .expect("create database");
    let settings = StoreSettings {
        url: url.clone(),
        pool_size: 2,
    };
    let store = Store::connect(&settings, "status").await.expect("connect");
    store.migrate().await.expect("migrate");
    store
        .upsert_tenant("t1", "Tenant", None)
        .await
        .expect("tenant");
    Db { store, url }
}

async fn one_delivery(store: &Store) -> Uuid {
    let message = Uuid::now_v7();
    store
        .ensure_message(NewMessage {
            id: message,
            tenant_id: "t1".into(),
            template_id: "order_shipped".into(),
            idempotency_key: None,
            request: "{}".into(),
            request_hash: vec![1],
            source: "amqp",
            traceparent: None,
        })
        .await
        .expect("message");
    let delivery = Uuid::now_v7();
    let row = NewDelivery {
        id: delivery,
        channel: "wechat.template".into(),
        provider_account: "acct".into(),
        recipient: "oUser".into(),
    };
    store
        .create_deliveries(message, "t1", std::slice::from_ref(&row))
        .await
        .expect("deliveries");
    // Creating the same deliveries again (a redelivered request) changes nothing.
    store
        .create_deliveries(message, "t1", &[row])
        .await
        .expect("idempotent");
    delivery
}

fn delivered_event(msgid: &str) -> DeliveryEvent {
    DeliveryEvent {
        event_id: format!("wechat:acct:{msgid}:TEMPLATESENDJOBFINISH"),
        provider: "wechat".into(),
        provider_account: "acct".into(),
        provider_msgid: msgid.into(),
        state: DeliveryState::Delivered as i32,
        provider_status: "success".into(),
        kind: "TEMPLATESENDJOBFINISH".into(),
        occurred_at: None,
    }
}

#[tokio::test]
async fn a_callback_before_the_send_result_waits_and_then_applies() {
    let db = fresh_store().await;
    let store = &db.store;
    let delivery = one_delivery(store).await;
    assert_eq!(
        store.claim_delivery(delivery).await.expect("claim"),
        Claim::Claimed { attempt: 1 }
    );

    // WeChat is fast: the callback for msgid 42 arrives before the sender stored msgid 42.
    let event = delivered_event("42");
    assert_eq!(
        store.apply_provider_event(&event).await.expect("apply"),
        ProviderEventOutcome::Pending
    );
    let state = store
        .record_outcome(
            delivery,
            &Outcome::Sent {
                provider_msgid: "42".into(),
            },
        )
        .await
        .expect("outcome");
    assert_eq!(
        state,
        DeliveryState::Delivered,
        "the waiting event applied with the send result"
    );

    // Providers retry callbacks: a replay changes nothing.
    assert_eq!(
        store.apply_provider_event(&event).await.expect("replay"),
        ProviderEventOutcome::Duplicate
    );
    // A redelivered job finds the delivery settled and does not send again.
    assert_eq!(
        store.claim_delivery(delivery).await.expect("claim"),
        Claim::Finished(DeliveryState::Delivered)
    );
    let pending: i64 = raw(&db.url)
        .await
        .query_one("SELECT count(*) FROM pending_provider_events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(pending, 0);
    herald_store::drop_database(&db.url).await.expect("drop");
}

#[tokio::test]
async fn transitions_are_monotonic() {
    let db = fresh_store().await;
    let store = &db.store;
    let delivery = one_delivery(store).await;
    store.claim_delivery(delivery).await.expect("claim");
    store
        .record_outcome(
            delivery,
            &Outcome::Sent {
                provider_msgid: "7".into(),
            },
        )
        .await
        .expect("sent");
    assert_eq!(
        store
            .apply_provider_event(&delivered_event("7"))
            .await
            .expect("apply"),
        ProviderEventOutcome::Applied
    );
    // A late failure report for a delivered message is stale, not applied.
    let mut late = delivered_event("7");
    late.event_id = "wechat:acct:7:late".into();
    late.state = DeliveryState::Failed as i32;
    assert_eq!(
        store.apply_provider_event(&late).await.expect("late"),
        ProviderEventOutcome::Stale
    );
    // A late send result does not overwrite delivered either.
    let state = store
        .record_outcome(
            delivery,
            &Outcome::Sent {
                provider_msgid: "7".into(),
            },
        )
        .await
        .expect("late sent");
    assert_eq!(state, DeliveryState::Delivered);
    let history: i64 = raw(&db.url)
        .await
        .query_one(
            "SELECT count(*) FROM delivery_events WHERE delivery_id = $1",
            &[&delivery],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        history, 4,
        "queued, sending, sent, delivered; nothing for the rejected changes"
    );
    herald_store::drop_database(&db.url).await.expect("drop");
}

#[tokio::test]
async fn status_events_with_no_listener_do_not_block_the_outbox() {
    let (db, broker, store) = with_broker().await;
    // Creating a delivery announces `queued` on the status exchange, which nobody binds here.
    one_delivery(&store).await;
    assert_eq!(store.relay_once(&broker.publisher()).await, Ok(1));
    let left: i64 = raw(&db.url)
        .await
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        left, 0,
        "an announcement nobody listens to is published and gone"
    );
    end_with_broker(db, broker).await;
}

#[tokio::test]
async fn the_relay_takes_urgent_jobs_before_an_older_backlog() {
    let (db, broker, store) = with_broker().await;
    // A backlog of 700 bulk rows (announcements nobody listens to, so publishing them needs
    // no queue), then one urgent row: more than one relay round's worth ahead of it.
    let client = raw(&db.url).await;
    let exchange = broker.topology().status_exchange();
    client
        .execute(
            "INSERT INTO outbox (exchange, routing_key, headers, body, mandatory, priority)
             SELECT $1, 'status.backlog', '{}'::jsonb, '{}'::bytea, false, 0
             FROM generate_series(1, 700)",
            &[&exchange],
        )
        .await
        .expect("backlog");
    client
        .execute(
            "INSERT INTO outbox (exchange, routing_key, headers, body, mandatory, priority)
             VALUES ($1, 'status.urgent', '{}'::jsonb, '{}'::bytea, false, 9)",
            &[&exchange],
        )
        .await
        .expect("urgent row");
    let first_round = store.relay_once(&broker.publisher()).await.expect("relay");
    assert!(first_round < 701, "one round takes a batch, not everything");
    let urgent_left: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE routing_key = 'status.urgent'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(urgent_left, 0, "the urgent row went in the first round");
    while store.relay_once(&broker.publisher()).await.expect("relay") > 0 {}
    let left: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "the backlog follows");
    end_with_broker(db, broker).await;
}

/// A fresh database, a topology under its own prefix, and a store that relays to it.
async fn with_broker() -> (Db, herald_amqp::Broker, Store) {
    let db = fresh_store().await;
    let settings = herald_amqp::AmqpSettings {
        prefix: format!("herald-test-{}", &Uuid::new_v4().simple().to_string()[..12]),
        queue_expires_ms: Some(600_000),
        ..Default::default()
    };
    let broker = herald_amqp::Broker::connect(&settings, "tests")
        .await
        .expect("broker");
    broker.declare_topology().await.expect("topology");
    let store = Store::connect(
        &StoreSettings {
            url: db.url.clone(),
            pool_size: 2,
        },
        &broker.topology().status_exchange(),
    )
    .await
    .expect("store");
    (db, broker, store)
}

async fn end_with_broker(db: Db, broker: herald_amqp::Broker) {
    broker.delete_topology().await.expect("delete topology");
    broker.close().await;
    herald_store::drop_database(&db.url).await.expect("drop");
}

async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}
