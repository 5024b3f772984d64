//! The per-account circuit breaker: WeChat answers 503 to everything; after a few failures the
//! breaker opens and jobs wait in the delay tiers without calling (their attempts do not grow),
//! one probe at a time checks the provider; once it recovers the breaker closes and the backlog
//! drains with every message delivered.

use std::time::Duration;

use herald_contract::v1::{DeliveryState, Priority};
use herald_e2e::{TestEnv, demo, metric_sample, openid};
use herald_sandbox::{Fault, paths};
use herald_sender::breaker::BreakerSettings;

const JOBS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_provider_opens_the_breaker_and_the_backlog_drains_after_recovery() {
    let mut env = TestEnv::start_with(|config| {
        config.telemetry.admin_listen = Some("127.0.0.1:0".into());
        config.sender.breaker = BreakerSettings {
            failure_threshold: 3,
            open_ms: 1_000,
            max_open_ms: 2_000,
        };
    })
    .await;
    env.stack.sandbox.inject_faults(
        paths::TEMPLATE_SEND,
        vec![Fault::Status { status: 503 }; 100_000],
    );
    let calls = |env: &TestEnv| {
        env.stack
            .sandbox
            .requests()
            .iter()
            .filter(|r| r.path == paths::TEMPLATE_SEND)
            .count()
    };
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for n in 0..JOBS {
            ids.push(
                env.send_demo_to(&[openid(n)], Priority::Normal, &format!("BR-{n}"))
                    .await,
            );
        }
        ids
    };

    let account = [("account", demo::ACCOUNT)];
    env.scrape_until(|text| metric_sample(text, "herald_breaker_open", &account) == Some(1.0))
        .await;
    let opened = tokio::time::Instant::now();
    // Every job comes back several times while the provider is down...
    env.scrape_until(|text| {
        metric_sample(text, "herald_sender_breaker_deferred_total", &account)
            .is_some_and(|n| n >= (5 * JOBS) as f64)
    })
    .await;
    // ...yet the provider saw each job's first attempt (all in flight before the breaker
    // opened) and then only probes, at most one per open period (1 s, then 2 s). Without the
    // breaker every comeback would be a call: several per job by now.
    let made = calls(&env);
    let bound = JOBS + opened.elapsed().as_secs() as usize + 2;
    assert!(
        made <= bound,
        "{made} calls in all; at most {bound} ({JOBS} first attempts and probes) while the \
         breaker was open for {:?}",
        opened.elapsed()
    );

    // The provider recovers: the next probe closes the breaker and everything is delivered.
    env.stack
        .sandbox
        .inject_faults(paths::TEMPLATE_SEND, vec![]);
    env.wait_for_statuses(&ids, DeliveryState::Delivered, Duration::from_secs(30))
        .await;
    env.scrape_until(|text| metric_sample(text, "herald_breaker_open", &account) == Some(0.0))
        .await;
    env.stop().await;
}
