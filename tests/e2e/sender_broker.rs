//! The broker connection of a worker is cut mid-run (through a TCP proxy the test controls):
//! the worker reconnects, jobs whose acks were lost come back and are recognised as settled,
//! every job ends final and no user gets a message twice.

use std::collections::HashMap;
use std::time::Duration;

use herald_contract::v1::{DeliveryState, Priority};
use herald_e2e::{TcpProxy, TestEnv, demo, openid};
use herald_sender::limit::{AccountSettings, RateLimit};

const JOBS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_broker_connection_loses_nothing_and_sends_nothing_twice() {
    let mut env = TestEnv::start_with(|config| {
        config.sender.channels = vec![];
        // Slow enough that the cut lands mid-run.
        config.sender.accounts.insert(
            demo::ACCOUNT.into(),
            AccountSettings {
                rate_limit: Some(RateLimit {
                    per_second: 100.0,
                    burst: 1,
                }),
                ..Default::default()
            },
        );
    })
    .await;
    env.stack.sandbox.set_callback_url(demo::APPID, None);
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let worker = env.stack.spawn_sender(|config| {
        config.amqp.url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    });

    let openids: Vec<String> = (0..JOBS).map(openid).collect();
    env.send_demo_to(&openids, Priority::Normal, "BC-1").await;
    let before = env
        .stack
        .sandbox
        .wait_for_accepted_sends(JOBS / 4, Duration::from_secs(30))
        .await
        .len();
    let connections = proxy.accepted();
    proxy.cut();
    assert!(before < JOBS, "the cut came mid-run ({before} sent)");

    env.wait_for_deliveries(DeliveryState::Sent, JOBS, Duration::from_secs(90))
        .await;
    assert!(
        proxy.accepted() > connections,
        "the worker reconnected through the proxy"
    );
    worker.stop().await.expect("worker stops");

    let mut per_user: HashMap<String, usize> = HashMap::new();
    for send in env.stack.sandbox.accepted_sends() {
        *per_user.entry(send.openid).or_default() += 1;
    }
    assert_eq!(per_user.len(), JOBS, "every user got the message");
    let twice: Vec<_> = per_user.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent twice: {twice:?}");

    let db = env.db().await;
    let states = db
        .query("SELECT state, count(*) FROM deliveries GROUP BY state", &[])
        .await
        .expect("states");
    let states: Vec<(String, i64)> = states.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(states, [("sent".to_string(), JOBS as i64)], "all final");
    env.stop().await;
}
