//! Priority lanes: with a thousand bulk jobs being worked through, an urgent one overtakes
//! them (it has its own queue and its own share of the worker).

use std::time::Duration;

use herald_contract::v1::{DeliveryState, Priority};
use herald_e2e::{TestEnv, demo, openid};
use herald_sandbox::paths;
use herald_sender::limit::{AccountSettings, RateLimit};

const BULK: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_job_overtakes_a_bulk_backlog() {
    let mut env = TestEnv::start_with(|config| {
        config.sender.channels = vec![];
        config.sender.accounts.insert(
            demo::ACCOUNT.into(),
            AccountSettings {
                rate_limit: Some(RateLimit {
                    per_second: 200.0,
                    burst: 1,
                }),
                ..Default::default()
            },
        );
    })
    .await;
    env.stack.sandbox.set_callback_url(demo::APPID, None);
    let bulk: Vec<String> = (0..BULK).map(openid).collect();
    env.send_demo_to(&bulk, Priority::Bulk, "BULK-1").await;
    env.wait_for_deliveries(DeliveryState::Queued, BULK, Duration::from_secs(60))
        .await;
    let bulk_queue = env.broker.topology().lane_queue(
        herald_contract::channels::WECHAT_TEMPLATE,
        herald_amqp::Lane::Bulk,
    );
    // Jobs and `queued` events leave through the outbox, possibly by different relays: the
    // last jobs may land a moment after the last event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while env.queue_depth(&bulk_queue).await < BULK as u32 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bulk lane never filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.queue_depth(&bulk_queue).await, BULK as u32, "bulk lane");

    let worker = env.stack.spawn_sender(|_| {});
    // The backlog is being worked on when the urgent request arrives.
    env.stack
        .sandbox
        .wait_for_requests(paths::TEMPLATE_SEND, 20, Duration::from_secs(20))
        .await;
    let urgent = openid(BULK + 1);
    env.send_demo_to(std::slice::from_ref(&urgent), Priority::Urgent, "URGENT-1")
        .await;
    env.wait_for_deliveries(DeliveryState::Sent, BULK + 1, Duration::from_secs(60))
        .await;
    worker.stop().await.expect("worker stops");

    let sends: Vec<String> = env
        .stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path == paths::TEMPLATE_SEND)
        .filter_map(|r| r.body["touser"].as_str().map(str::to_string))
        .collect();
    let position = sends
        .iter()
        .position(|openid| *openid == urgent)
        .expect("the urgent job was sent");
    assert!(
        position < BULK * 9 / 10,
        "the urgent job was send number {position}, after 90% of the bulk"
    );
    env.stop().await;
}
