//! Rate limits shared by all replicas: three sender instances against one account limited to
//! 50 sends a second. The sandbox's receive log is the judge: no 1-second window holds more
//! than 50 sends, and the run is close to the ideal (1,500 sends take 30 s at 50/s).

use std::time::Duration;

use herald_contract::v1::{DeliveryState, Priority};
use herald_e2e::{TestEnv, demo, openid};
use herald_sandbox::paths;
use herald_sender::limit::{AccountSettings, RateLimit};

const JOBS: usize = 1_500;
const PER_SECOND: f64 = 50.0;
/// 10% of each second: slack for the time between a slot and WeChat receiving the call, which
/// on a loaded two-core machine running the whole stack in one process reaches tens of ms.
const MARGIN_MS: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_together_stay_under_the_account_limit() {
    let mut env = TestEnv::start_with(|config| {
        // The test runs its own three workers.
        config.sender.channels = vec![];
        config.sender.accounts.insert(
            demo::ACCOUNT.into(),
            AccountSettings {
                rate_limit: Some(RateLimit {
                    per_second: PER_SECOND,
                    burst: 1,
                }),
                ..Default::default()
            },
        );
    })
    .await;
    // Only the sends matter here: no delivery callbacks.
    env.stack.sandbox.set_callback_url(demo::APPID, None);

    // One request per recipient, published concurrently (like 1,500 producers' calls).
    let requests = (0..JOBS).map(|n| {
        let env = &env;
        async move {
            env.send_demo_to(&[openid(n)], Priority::Normal, &format!("RL-{n}"))
                .await
        }
    });
    futures::future::join_all(requests).await;
    env.wait_for_deliveries(DeliveryState::Queued, JOBS, Duration::from_secs(60))
        .await;

    let workers: Vec<_> = (0..3)
        .map(|_| {
            env.stack.spawn_sender(|config| {
                config.sender.replicas = 3;
                config.sender.rate_limit_margin_ms = MARGIN_MS;
            })
        })
        .collect();
    env.stack
        .sandbox
        .wait_for_accepted_sends(JOBS, Duration::from_secs(90))
        .await;
    for worker in workers {
        worker.stop().await.expect("worker stops cleanly");
    }

    let mut at: Vec<_> = env
        .stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path == paths::TEMPLATE_SEND)
        .map(|r| r.at)
        .collect();
    at.sort();
    assert_eq!(at.len(), JOBS, "one call per job");
    let limit = PER_SECOND as usize;
    let tightest = (0..at.len() - limit)
        .map(|i| at[i + limit] - at[i])
        .min()
        .expect("enough sends");
    eprintln!(
        "tightest span of {} sends: {tightest:?}; all took {:?}",
        limit + 1,
        at[JOBS - 1] - at[0]
    );
    let second = chrono::Duration::seconds(1);
    let mut busiest = 0;
    let mut end = 0;
    for start in 0..at.len() {
        while end < at.len() && at[end] < at[start] + second {
            end += 1;
        }
        busiest = busiest.max(end - start);
    }
    assert!(
        busiest <= PER_SECOND as usize,
        "a 1-second window saw {busiest} sends (limit {PER_SECOND})"
    );
    let took = (at[JOBS - 1] - at[0]).to_std().expect("ordered");
    // The margin spaces sends 10% wider; beyond that, little time may be lost.
    let ideal = Duration::from_secs_f64((JOBS - 1) as f64 / PER_SECOND);
    assert!(
        took <= ideal.mul_f64(1.2),
        "{JOBS} sends took {took:?}; ideal {ideal:?}"
    );
    env.stop().await;
}
