//! The token service's metrics, captured with `metrics-util`'s `DebuggingRecorder` installed as
//! a thread-local recorder around a current-thread runtime: everything the service does (its
//! own spawned tasks included) runs on this thread, so parallel tests never see each other's
//! numbers. Real Redis at 127.0.0.1:6379 under a unique prefix; the sandbox or the scripted fake
//! as the provider.

mod fake_wechat;
mod support;

use std::collections::BTreeMap;

use fake_wechat::{FakeWeChat, Reply};
use herald_token::{AccountConfig, AccountKind, TokenEndpoint, TokenService};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::*;

/// A current-thread runtime whose work is recorded by `recorder`.
struct Recorded {
    runtime: tokio::runtime::Runtime,
    recorder: DebuggingRecorder,
}

impl Recorded {
    fn new() -> Self {
        Self {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            recorder: DebuggingRecorder::new(),
        }
    }

    fn run<T>(&self, fut: impl Future<Output = T>) -> T {
        metrics::with_local_recorder(&self.recorder, || self.runtime.block_on(fut))
    }

    fn snapshotter(&self) -> Snapshotter {
        self.recorder.snapshotter()
    }
}

/// One snapshot as `name{label=value,…}` → value (counters as u64, gauges as f64). Taking a
/// snapshot resets the recorder's values.
#[derive(Debug)]
struct Values(BTreeMap<String, f64>);

impl Values {
    fn take(snapshotter: &Snapshotter) -> Self {
        let mut values = BTreeMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let mut labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.key().name(), labels.join(","));
            let value = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.0,
                DebugValue::Histogram(_) => continue,
            };
            values.insert(name, value);
        }
        Self(values)
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }

    fn expect(&self, name: &str) -> f64 {
        self.get(name)
            .unwrap_or_else(|| panic!("no {name} in {:#?}", self.0))
    }
}

fn wechat(endpoint: TokenEndpoint, base_url: &str, secret: &str) -> AccountConfig {
    account(endpoint, base_url, secret)
}

async fn today_count(prefix: &str, account: &str) -> (String, u64, i64) {
    let mut conn = redis_at(REDIS_URL).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}token-fetches:{account}:*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert_eq!(keys.len(), 1, "one counter per day: {keys:?}");
    let count: u64 = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .expect("count");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .expect("ttl");
    (keys[0].clone(), count, ttl)
}

#[test]
fn fetches_refreshes_by_cause_age_and_the_daily_count() {
    let recorded = Recorded::new();
    let prefix = unique_prefix();
    recorded.run(async {
        let provider = Provider::start().await;
        let mut cfg = config(
            &prefix,
            REDIS_URL,
            vec![(
                "oa",
                wechat(TokenEndpoint::Stable, &provider.base_url, SECRET),
            )],
        );
        // Every token is past this share of its lifetime at once: refresh_due renews it.
        cfg.refresh_at = 1e-9;
        let service = TokenService::new(cfg).await.expect("service");

        let first = service.token("oa").await.expect("cold fetch");
        let again = service.token("oa").await.expect("from redis");
        assert_eq!(again.access_token, first.access_token);
        let second = service
            .invalidate("oa", &first.access_token)
            .await
            .expect("forced refresh");
        assert_ne!(second.access_token, first.access_token);
        // A report of a token that is no longer current changes nothing.
        service
            .invalidate("oa", &first.access_token)
            .await
            .expect("current token");
        service.refresh_due().await;
        let calls = provider.sandbox.token_calls(APPID);
        assert_eq!((calls.stable, calls.stable_forced), (3, 1));

        let (key, count, ttl) = today_count(&prefix, "oa").await;
        let day = key.rsplit(':').next().unwrap_or_default();
        assert!(
            day.len() == 8 && day.bytes().all(|b| b.is_ascii_digit()),
            "{key}"
        );
        assert_eq!(count, 3);
        assert!(ttl > 0 && ttl <= 2 * 24 * 3600, "ttl {ttl}");
    });
    let values = Values::take(&recorded.snapshotter());
    let oa = "account=oa";
    assert_eq!(
        values.expect(&format!("herald_token_fetches_total{{{oa},outcome=ok}}")),
        3.0
    );
    for outcome in ["transient_error", "config_error"] {
        assert_eq!(
            values.get(&format!(
                "herald_token_fetches_total{{{oa},outcome={outcome}}}"
            )),
            None
        );
    }
    for cause in ["cold", "invalidated", "proactive"] {
        assert_eq!(
            values.expect(&format!(
                "herald_token_refreshes_total{{{oa},cause={cause}}}"
            )),
            1.0,
            "{cause}"
        );
    }
    let age = values.expect(&format!("herald_token_age_seconds{{{oa}}}"));
    assert!((0.0..5.0).contains(&age), "age {age}");
    assert_eq!(
        values.expect(&format!("herald_token_daily_fetches{{{oa}}}")),
        3.0
    );
    assert_eq!(
        values.expect(&format!("herald_token_daily_limit{{{oa}}}")),
        500_000.0
    );
    assert_eq!(
        values.expect(&format!("herald_token_account_misconfigured{{{oa}}}")),
        0.0
    );
    recorded.run(cleanup(&prefix));
}

#[test]
fn outcomes_misconfiguration_and_daily_limits_by_account_kind() {
    let recorded = Recorded::new();
    let prefix = unique_prefix();
    recorded.run(async {
        let flaky = FakeWeChat::start("wxflaky", "right").await;
        flaky.script(&[Reply::Errcode(-1), Reply::Http500]);
        let wrong = FakeWeChat::start("wxwrong", "the-real-secret").await;
        let wecom = FakeWeChat::start("wwcorp", "right").await;
        let mut flaky_account = wechat(TokenEndpoint::Classic, &flaky.base_url, "right");
        flaky_account.appid = "wxflaky".into();
        let mut wrong_account = wechat(TokenEndpoint::Stable, &wrong.base_url, "wrong");
        wrong_account.appid = "wxwrong".into();
        let wecom_account = AccountConfig {
            kind: AccountKind::WecomApp,
            appid: "wwcorp".into(),
            agent_id: Some("1000002".into()),
            ..wechat(TokenEndpoint::Stable, &wecom.base_url, "right")
        };
        let service = TokenService::new(config(
            &prefix,
            REDIS_URL,
            vec![
                ("flaky", flaky_account),
                ("wrong", wrong_account),
                ("wecom", wecom_account),
            ],
        ))
        .await
        .expect("service");
        service.token("flaky").await.expect("third try works");
        assert_eq!(flaky.total(), 3);
        let err = service.token("wrong").await.expect_err("misconfigured");
        assert!(err.to_string().contains("40125"), "{err}");
        service.token("wecom").await.expect("wecom token");
        let (_, count, _) = today_count(&prefix, "flaky").await;
        assert_eq!(count, 3, "every call counts against the quota");
    });
    let values = Values::take(&recorded.snapshotter());
    let flaky = "account=flaky";
    assert_eq!(
        values.expect(&format!(
            "herald_token_fetches_total{{{flaky},outcome=transient_error}}"
        )),
        2.0
    );
    assert_eq!(
        values.expect(&format!("herald_token_fetches_total{{{flaky},outcome=ok}}")),
        1.0
    );
    assert_eq!(
        values.expect(&format!(
            "herald_token_refreshes_total{{{flaky},cause=cold}}"
        )),
        1.0
    );
    assert_eq!(
        values.expect(&format!("herald_token_daily_fetches{{{flaky}}}")),
        3.0
    );
    assert_eq!(
        values.expect(&format!("herald_token_daily_limit{{{flaky}}}")),
        2000.0,
        "classic /cgi-bin/token"
    );

    let wrong = "account=wrong";
    assert_eq!(
        values.expect(&format!(
            "herald_token_fetches_total{{{wrong},outcome=config_error}}"
        )),
        1.0
    );
    assert_eq!(
        values.expect(&format!("herald_token_account_misconfigured{{{wrong}}}")),
        1.0
    );
    assert_eq!(
        values.get(&format!(
            "herald_token_refreshes_total{{{wrong},cause=cold}}"
        )),
        None,
        "no token, no refresh"
    );
    assert_eq!(
        values.expect(&format!("herald_token_account_misconfigured{{{flaky}}}")),
        0.0
    );

    let wecom = "account=wecom";
    assert_eq!(
        values.expect(&format!("herald_token_fetches_total{{{wecom},outcome=ok}}")),
        1.0
    );
    assert_eq!(
        values.get(&format!("herald_token_daily_limit{{{wecom}}}")),
        None,
        "WeCom publishes no daily limit"
    );
    recorded.run(cleanup(&prefix));
}

#[test]
fn the_daily_count_is_shared_by_replicas_and_kept_locally_without_redis() {
    let prefix = unique_prefix();
    // The fake provider runs on a runtime of its own, driven by its own thread, so it answers
    // while each replica's runtime runs in turn below.
    let provider_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("provider runtime");
    let provider = provider_runtime.block_on(FakeWeChat::start(APPID, SECRET));
    let base_url = provider.base_url.clone();

    // Replica A fetches once.
    let a = Recorded::new();
    a.run(async {
        let service = TokenService::new(config(
            &prefix,
            REDIS_URL,
            vec![("oa", wechat(TokenEndpoint::Stable, &base_url, SECRET))],
        ))
        .await
        .expect("service");
        service.token("oa").await.expect("token");
    });
    // Replica B fetches nothing but its refresher pass reads the shared count.
    let b = Recorded::new();
    b.run(async {
        let service = TokenService::new(config(
            &prefix,
            REDIS_URL,
            vec![("oa", wechat(TokenEndpoint::Stable, &base_url, SECRET))],
        ))
        .await
        .expect("service");
        service.refresh_due().await;
    });
    let b_values = Values::take(&b.snapshotter());
    assert_eq!(
        b_values.expect("herald_token_daily_fetches{account=oa}"),
        1.0
    );
    assert_eq!(
        b_values.get("herald_token_fetches_total{account=oa,outcome=ok}"),
        None,
        "B did not call the provider"
    );

    // Without Redis a replica counts its own calls.
    let alone = Recorded::new();
    alone.run(async {
        let service = TokenService::new(config(
            &prefix,
            "redis://127.0.0.1:1/",
            vec![("oa", wechat(TokenEndpoint::Stable, &base_url, SECRET))],
        ))
        .await
        .expect("service");
        let token = service.token("oa").await.expect("token");
        service
            .invalidate("oa", &token.access_token)
            .await
            .expect("forced");
        service.refresh_due().await;
    });
    let alone_values = Values::take(&alone.snapshotter());
    assert_eq!(
        alone_values.expect("herald_token_daily_fetches{account=oa}"),
        2.0
    );
    assert_eq!(
        provider.total(),
        3,
        "A's fetch, then the lone replica's two"
    );
    a.run(cleanup(&prefix));
    drop(provider);
    provider_runtime.shutdown_background();
}
