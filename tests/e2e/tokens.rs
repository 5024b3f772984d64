//! Access tokens through the whole stack: a token the provider revokes costs one forced refresh
//! however many sends meet it, a token nearing expiry is replaced before any send meets 42001,
//! and a wrong secret fails deliveries for good without hammering the provider.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use herald_contract::v1::DeliveryState;
use herald_e2e::{TestEnv, demo};
use herald_sandbox::{LoggedRequest, paths};
use heraldctl::HeraldConfig;

/// A 28-character openid of [A-Za-z0-9], distinct per `tag` and `n`.
fn openid(tag: char, n: usize) -> String {
    format!("oTok{tag}{n:0>23}")
}

fn template_sends(env: &TestEnv) -> Vec<LoggedRequest> {
    env.stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path == paths::TEMPLATE_SEND)
        .collect()
}

fn token_calls_logged(env: &TestEnv) -> Vec<LoggedRequest> {
    env.stack
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path == paths::STABLE_TOKEN)
        .collect()
}

fn errcode(request: &LoggedRequest) -> i64 {
    request.response["errcode"].as_i64().unwrap_or(i64::MIN)
}

/// Publishes one demo request per openid; answers the message ids.
async fn send_all(env: &TestEnv, openids: &[String], order: &str) -> Vec<String> {
    let mut ids = Vec::with_capacity(openids.len());
    for (i, openid) in openids.iter().enumerate() {
        ids.push(env.send_demo(openid, &format!("{order}-{i}")).await);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_costs_one_forced_refresh_for_200_sends_and_none_is_sent_twice() {
    let mut env = TestEnv::start().await;
    let sandbox = env.stack.sandbox.clone();
    // The sender holds the current token.
    let warm = env.send_demo(&openid('W', 0), "WARM").await;
    env.wait_for_status(&warm, DeliveryState::Delivered).await;
    let before = sandbox.token_calls(demo::APPID);
    assert_eq!(before.stable_forced, 0);

    assert!(sandbox.invalidate_tokens(demo::APPID) >= 1);
    let openids: Vec<String> = (1..=200).map(|n| openid('R', n)).collect();
    let ids = send_all(&env, &openids, "REV").await;
    env.wait_for_statuses(&ids, DeliveryState::Delivered, Duration::from_secs(180))
        .await;

    let after = sandbox.token_calls(demo::APPID);
    assert_eq!(
        after.stable_forced - before.stable_forced,
        1,
        "exactly one forced refresh"
    );
    assert_eq!(
        after.stable - before.stable,
        1,
        "and no other token call: {before:?} → {after:?}"
    );
    assert_eq!(after.classic, 0);

    let sends = template_sends(&env);
    let mut accepted: HashMap<&str, usize> = HashMap::new();
    let mut rejected = 0;
    for send in &sends {
        match errcode(send) {
            0 => {
                *accepted
                    .entry(send.body["touser"].as_str().unwrap_or(""))
                    .or_default() += 1
            }
            40001 => rejected += 1,
            other => panic!("unexpected errcode {other}: {:?}", send.response),
        }
    }
    assert!(rejected >= 1, "the revoked token was met");
    for openid in &openids {
        assert_eq!(
            accepted.get(openid.as_str()),
            Some(&1),
            "{openid} sent exactly once"
        );
    }
    env.stop().await;
}

/// Token lifetimes shrunk to seconds (12 s, stable_token reissuing 3 s before expiry), the token
/// service renewing at half the lifetime. First with no traffic at all: the background refresh
/// alone replaces the token before it expires. Then with sends running continuously through
/// two more renewals: no send is answered 42001 (or 40001).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_nearing_expiry_is_replaced_before_any_send_meets_42001() {
    const TTL_SECS: i64 = 12;
    let mut env = TestEnv::start_with(|config| {
        config.sandbox.token_ttl_secs = TTL_SECS as u64;
        config.sandbox.stable_reissue_window_secs = 3;
        config.token.refresh_at = 0.5;
    })
    .await;
    let sandbox = env.stack.sandbox.clone();
    let issued = |log: &[LoggedRequest]| -> Vec<String> {
        let mut tokens: Vec<String> = Vec::new();
        for call in log {
            if let Some(token) = call.response["access_token"].as_str()
                && tokens.last().map(String::as_str) != Some(token)
            {
                tokens.push(token.to_string());
            }
        }
        tokens
    };

    // Quiet phase: no sends. Await the token calls the background refresher makes until one
    // of them brings a new token.
    let mut seen = 0;
    loop {
        let log = sandbox
            .wait_for_requests(
                paths::STABLE_TOKEN,
                seen + 1,
                Duration::from_secs(3 * TTL_SECS as u64),
            )
            .await;
        assert!(
            log.len() > seen,
            "no token call within {} s: the token is not renewed proactively",
            3 * TTL_SECS
        );
        seen = log.len();
        if issued(&log).len() >= 2 {
            break;
        }
    }
    assert!(template_sends(&env).is_empty());

    // Busy phase: waves of sends until two more tokens have been issued, then one more wave.
    let mut ids = Vec::new();
    let mut wave = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8 * TTL_SECS as u64);
    let mut last_wave = false;
    loop {
        let openids: Vec<String> = (0..4).map(|n| openid('E', wave * 4 + n)).collect();
        let wave_ids = send_all(&env, &openids, &format!("EXP{wave}")).await;
        env.wait_for_statuses(&wave_ids, DeliveryState::Delivered, Duration::from_secs(30))
            .await;
        ids.extend(wave_ids);
        wave += 1;
        if last_wave {
            break;
        }
        last_wave = issued(&token_calls_logged(&env)).len() >= 4;
        assert!(
            tokio::time::Instant::now() < deadline,
            "tokens were not renewed under traffic"
        );
    }

    let sends = template_sends(&env);
    assert_eq!(sends.len(), ids.len(), "one send per message, no retries");
    let refused: Vec<_> = sends.iter().filter(|s| errcode(s) != 0).collect();
    assert!(refused.is_empty(), "sends refused: {refused:#?}");
    let used: std::collections::BTreeSet<&str> = sends
        .iter()
        .filter_map(|s| s.query.get("access_token").map(String::as_str))
        .collect();
    assert!(used.len() >= 3, "the sends spanned renewals: {used:?}");

    // Every token was replaced while it still worked, and renewals did not storm the provider.
    // (The log keeps a token's last 6 characters: enough to tell tokens apart.)
    let calls = token_calls_logged(&env);
    let mut expiry: BTreeMap<String, i64> = BTreeMap::new();
    let mut previous: Option<String> = None;
    for call in &calls {
        let token = call.response["access_token"]
            .as_str()
            .expect("every token call succeeded")
            .to_string();
        let expires_in = call.response["expires_in"].as_i64().expect("expires_in");
        if previous.as_ref().is_some_and(|p| *p != token) {
            let old = previous.as_ref().expect("previous token");
            assert!(
                call.at.timestamp_millis() < expiry[old],
                "{token} issued at {} after {old} expired (at {} ms)",
                call.at,
                expiry[old]
            );
        }
        let ends = call.at.timestamp_millis() + expires_in * 1000;
        let entry = expiry.entry(token.clone()).or_insert(ends);
        *entry = (*entry).max(ends);
        previous = Some(token);
    }
    assert_eq!(sandbox.token_calls(demo::APPID).stable_forced, 0);
    assert!(
        calls.len() <= 4 * issued(&calls).len() + 1,
        "{} token calls for {} tokens",
        calls.len(),
        issued(&calls).len()
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_fails_deliveries_for_good_and_asks_the_provider_once() {
    let mut env = TestEnv::start_with(|config| {
        let mut account = HeraldConfig::default()
            .with_demo_account()
            .token
            .accounts
            .remove(demo::ACCOUNT)
            .expect("the demo account");
        account.secret = Some("not-the-demo-secret".into());
        config.token.accounts.insert(demo::ACCOUNT.into(), account);
    })
    .await;
    let openids: Vec<String> = (0..20).map(|n| openid('S', n)).collect();
    let ids = send_all(&env, &openids, "SEC").await;
    let failed = env
        .wait_for_statuses(&ids, DeliveryState::Failed, Duration::from_secs(60))
        .await;
    for event in &failed {
        assert_eq!(event.error_code, "token", "{event:?}");
        assert!(
            event.error_message.contains("misconfigured") && event.error_message.contains("40125"),
            "{}",
            event.error_message
        );
    }
    assert!(template_sends(&env).is_empty(), "nothing was sent");
    let calls = env.stack.sandbox.token_calls(demo::APPID);
    assert_eq!(
        calls.stable, 1,
        "one token call for 20 deliveries (the next is due in a minute): {calls:?}"
    );

    let http = reqwest::Client::new();
    let ready = http
        .get(format!("{}/readyz", env.stack.token_url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 503);
    let ready: serde_json::Value = ready.json().await.expect("readyz json");
    assert_eq!(ready["misconfigured_accounts"][0]["account"], demo::ACCOUNT);
    assert_eq!(ready["misconfigured_accounts"][0]["errcode"], 40125);
    let health = http
        .get(format!("{}/healthz", env.stack.token_url))
        .send()
        .await
        .expect("the token service is still up");
    assert_eq!(health.status().as_u16(), 200);
    env.stop().await;
}
