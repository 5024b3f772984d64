//! How the sender settles a delivery by the provider's answer, with its metrics: retries on
//! the channel's schedule, permanent failures (and the alert for a template error), quota
//! deferrals that wait for the configured reset without using up an attempt, and transport
//! faults whose outcome is unknown (the same client_msg_id keeps WeChat to one delivery).
//!
//! Each test runs on its own current-thread runtime with a thread-local `metrics` recorder,
//! so everything the stack does in it is counted there and parallel tests never mix numbers.

use std::collections::BTreeMap;

use herald_contract::v1::DeliveryState;
use herald_e2e::{TestEnv, demo, timeline};
use herald_sandbox::{Fault, paths};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// Runs `test` on a fresh current-thread runtime under a local recorder; returns the counters
/// as `name{label=value,...}` (labels sorted) → value.
fn recorded<F: Future<Output = ()>>(test: impl FnOnce() -> F) -> BTreeMap<String, u64> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    metrics::with_local_recorder(&recorder, || runtime.block_on(test()));
    let mut counters = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if let DebugValue::Counter(n) = value {
            let mut labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            counters.insert(format!("{}{{{}}}", key.key().name(), labels.join(",")), n);
        }
    }
    counters
}

const CHANNEL: &str = "wechat.template";

fn outcome(outcome: &str, code: &str) -> String {
    format!("herald_sender_outcomes_total{{channel={CHANNEL},code={code},outcome={outcome}}}")
}

fn alert(kind: &str) -> String {
    format!(
        "herald_sender_alerts_total{{account={},channel={CHANNEL},kind={kind}}}",
        demo::ACCOUNT
    )
}

fn alerts(counters: &BTreeMap<String, u64>) -> Vec<&String> {
    counters
        .keys()
        .filter(|k| k.starts_with("herald_sender_alerts_total"))
        .collect()
}

#[test]
fn system_busy_three_times_then_sent_is_one_send_after_four_calls() {
    let counters = recorded(|| async {
        let mut env = TestEnv::start().await;
        env.stack
            .sandbox
            .inject_errors(paths::TEMPLATE_SEND, vec![-1, -1, -1]);
        let id = env.send_demo(demo::OPENID, "B-3").await;
        env.wait_for_status(&id, DeliveryState::Delivered).await;

        let view = env.get_message(&id).await;
        assert_eq!(view["deliveries"][0]["attempts"], 4);
        assert_eq!(
            timeline(&view),
            [
                "queued",
                "sending",
                "retrying",
                "sending",
                "retrying",
                "sending",
                "retrying",
                "sending",
                "sent",
                "delivered"
            ]
        );
        let sends = env.sends_to(demo::OPENID);
        assert_eq!(sends.len(), 4, "four calls");
        let ids: std::collections::BTreeSet<_> = sends
            .iter()
            .map(|s| s.body["client_msg_id"].to_string())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "one client_msg_id across the attempts: {ids:?}"
        );
        let delivered: Vec<_> = env
            .stack
            .sandbox
            .accepted_sends()
            .into_iter()
            .filter(|s| s.openid == demo::OPENID)
            .collect();
        assert_eq!(delivered.len(), 1, "one message reached the user");
        env.stop().await;
    });
    assert_eq!(
        counters.get(&outcome("retrying", "-1")),
        Some(&3),
        "{counters:#?}"
    );
    assert_eq!(
        counters.get(&outcome("sent", "0")),
        Some(&1),
        "{counters:#?}"
    );
    // The schedule is the test tiers, 200ms then 1s (repeating).
    for (tier, n) in [("200ms", 1), ("1s", 2)] {
        assert_eq!(
            counters.get(&format!(
                "herald_sender_retries_total{{channel={CHANNEL},tier={tier}}}"
            )),
            Some(&n),
            "{counters:#?}"
        );
    }
    assert_eq!(
        counters.get("herald_provider_answers_total{code=-1,provider=wechat}"),
        Some(&3)
    );
    assert!(alerts(&counters).is_empty(), "{counters:#?}");
}

#[test]
fn a_bad_template_fails_at_once_and_raises_the_alert() {
    let counters = recorded(|| async {
        let mut env = TestEnv::start().await;
        env.stack
            .sandbox
            .inject_errors(paths::TEMPLATE_SEND, vec![40037]);
        let id = env.send_demo(demo::OPENID, "T-1").await;
        let failed = env.wait_for_status(&id, DeliveryState::Failed).await;
        assert_eq!(failed.error_code, "40037");

        let view = env.get_message(&id).await;
        assert_eq!(timeline(&view), ["queued", "sending", "failed"]);
        assert_eq!(view["deliveries"][0]["attempts"], 1);
        assert_eq!(env.sends_to(demo::OPENID).len(), 1, "no retry");
        env.stop().await;
    });
    assert_eq!(counters.get(&alert("template")), Some(&1), "{counters:#?}");
    assert_eq!(counters.get(&outcome("failed", "40037")), Some(&1));
    assert_eq!(counters.get(&outcome("retrying", "40037")), None);
}

#[test]
fn a_refused_subscription_fails_for_the_recipient_without_an_alert() {
    let counters = recorded(|| async {
        let mut env = TestEnv::start().await;
        env.stack
            .sandbox
            .inject_errors(paths::TEMPLATE_SEND, vec![43101]);
        let id = env.send_demo(demo::OPENID, "R-1").await;
        let failed = env.wait_for_status(&id, DeliveryState::Failed).await;
        assert_eq!(failed.error_code, "43101");
        let view = env.get_message(&id).await;
        assert_eq!(timeline(&view), ["queued", "sending", "failed"]);
        assert_eq!(env.sends_to(demo::OPENID).len(), 1, "no retry");
        env.stop().await;
    });
    assert_eq!(
        counters.get(&outcome("failed", "43101")),
        Some(&1),
        "{counters:#?}"
    );
    assert!(alerts(&counters).is_empty(), "{counters:#?}");
}

#[test]
fn the_daily_quota_defers_until_the_reset_without_using_an_attempt() {
    let counters = recorded(|| async {
        let mut env = TestEnv::start_with(|config| config.sender.channels = vec![]).await;
        // The quota resets 6 seconds from now (in Beijing time, as WeChat's does): the worker
        // is configured now, once the stack is up, so the answer comes well before the reset.
        let beijing = chrono::FixedOffset::east_opt(8 * 3600).expect("offset");
        let reset = (chrono::Utc::now() + chrono::Duration::seconds(6)).with_timezone(&beijing);
        let reset_text = format!("{}+08:00", reset.format("%H:%M:%S"));
        let reset_at = reset.with_timezone(&chrono::Utc).with_nanosecond_zeroed();
        let worker = env.stack.spawn_sender(|config| {
            config.sender.quota_reset = reset_text.clone();
            // A deferral that used up an attempt would fail this delivery for good.
            config.sender.max_attempts = 1;
        });
        env.stack
            .sandbox
            .inject_errors(paths::TEMPLATE_SEND, vec![45009]);
        let id = env.send_demo(demo::OPENID, "Q-1").await;
        let deferred = env.wait_for_status(&id, DeliveryState::Deferred).await;
        assert_eq!(deferred.error_code, "45009");
        env.wait_for_status(&id, DeliveryState::Delivered).await;

        let sends = env.sends_to(demo::OPENID);
        assert_eq!(
            sends.len(),
            2,
            "one refused call, one after the reset: no loop"
        );
        assert!(
            sends[1].at >= reset_at,
            "the second call ({}) waited for the reset ({reset_at})",
            sends[1].at
        );
        let view = env.get_message(&id).await;
        assert_eq!(
            timeline(&view),
            [
                "queued",
                "sending",
                "deferred",
                "sending",
                "sent",
                "delivered"
            ]
        );
        worker.stop().await.expect("worker stops");
        env.stop().await;
    });
    assert_eq!(
        counters.get(&outcome("deferred", "45009")),
        Some(&1),
        "{counters:#?}"
    );
    assert_eq!(counters.get(&alert("quota")), Some(&1), "{counters:#?}");
    assert_eq!(counters.get(&outcome("sent", "0")), Some(&1));
}

#[test]
fn transport_faults_retry_and_the_user_gets_one_message() {
    let counters = recorded(|| async {
        let mut env = TestEnv::start().await;
        // HTTP 500 (not processed), then a reset after WeChat processed the send (outcome
        // unknown to the sender), then a normal answer to the retry.
        env.stack.sandbox.inject_faults(
            paths::TEMPLATE_SEND,
            vec![Fault::Status { status: 500 }, Fault::ResetAfter],
        );
        let id = env.send_demo(demo::OPENID, "F-1").await;
        env.wait_for_status(&id, DeliveryState::Delivered).await;

        let sends = env.sends_to(demo::OPENID);
        assert_eq!(sends.len(), 3);
        assert_eq!(sends[0].fault, Some(Fault::Status { status: 500 }));
        assert_eq!(sends[1].fault, Some(Fault::ResetAfter));
        let delivered: Vec<_> = env
            .stack
            .sandbox
            .accepted_sends()
            .into_iter()
            .filter(|s| s.openid == demo::OPENID)
            .collect();
        assert_eq!(
            delivered.len(),
            1,
            "the retry after the reset was a duplicate"
        );
        let view = env.get_message(&id).await;
        assert_eq!(view["deliveries"][0]["attempts"], 3);
        env.stop().await;
    });
    assert_eq!(
        counters.get(&outcome("retrying", "transport")),
        Some(&2),
        "{counters:#?}"
    );
}

trait ZeroNanos {
    fn with_nanosecond_zeroed(self) -> Self;
}

impl ZeroNanos for chrono::DateTime<chrono::Utc> {
    fn with_nanosecond_zeroed(self) -> Self {
        use chrono::Timelike;
        self.with_nanosecond(0).unwrap_or(self)
    }
}
