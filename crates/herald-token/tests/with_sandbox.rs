//! The token service against the real provider sandbox (`herald-sandbox`, in-process on a free
//! port) and Redis: the shared one at 127.0.0.1:6379 under a unique key prefix, or a private
//! `redis-server` the test starts and stops.

mod support;

use std::sync::Arc;

use herald_sandbox::TokenCalls;
use herald_token::TokenEndpoint;
use herald_token::client::TokenClientError;
use support::*;
use tokio::sync::Barrier;

const REQUESTS: usize = 500;
const REPLICAS: usize = 3;

/// Three replicas share one Redis prefix; 500 concurrent requests (and the three replicas'
/// own warm-up passes) arrive before any token exists: the provider is called once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_of_three_replicas_under_500_requests_fetches_once() {
    let prefix = unique_prefix();
    let provider = Provider::start().await;
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        let cfg = config(
            &prefix,
            REDIS_URL,
            vec![(
                "oa",
                account(TokenEndpoint::Stable, &provider.base_url, SECRET),
            )],
        );
        replicas.push(Replica::start_api_only(cfg).await);
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(200)
        .build()
        .expect("client");
    let barrier = Arc::new(Barrier::new(REQUESTS + REPLICAS));
    let mut requests = Vec::new();
    for i in 0..REQUESTS {
        let url = format!("{}/v1/tokens/oa", replicas[i % REPLICAS].url);
        let (http, barrier) = (http.clone(), barrier.clone());
        requests.push(tokio::spawn(async move {
            barrier.wait().await;
            let response = http
                .get(url)
                .bearer_auth(AUTH)
                .send()
                .await
                .expect("token request");
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.expect("json");
            (status, body)
        }));
    }
    // Each replica's background refresher warms up at start: part of the storm.
    let mut warmups = Vec::new();
    for replica in &replicas {
        let (service, barrier) = (replica.service.clone(), barrier.clone());
        warmups.push(tokio::spawn(async move {
            barrier.wait().await;
            service.refresh_due().await;
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    for request in requests {
        let (status, body) = within(request).await.expect("join");
        assert_eq!(status, 200, "{body}");
        tokens.insert(body["access_token"].as_str().expect("token").to_string());
    }
    for warmup in warmups {
        within(warmup).await.expect("warm-up");
    }
    assert_eq!(tokens.len(), 1, "every request got the same token");
    assert_eq!(
        provider.sandbox.token_calls(APPID),
        TokenCalls {
            classic: 0,
            stable: 1,
            stable_forced: 0,
        },
        "exactly one fetch at the provider"
    );
    let token = tokens.into_iter().next().unwrap_or_default();
    assert_eq!(provider.send_with(&token).await, 0, "the token works");
    for replica in replicas {
        replica.stop().await;
    }
    cleanup(&prefix).await;
}

/// A wrong secret is a configuration error: reported as such to every caller and by /readyz,
/// and the provider is asked once, not once per request or per replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_reported_and_not_retried_in_a_storm() {
    let prefix = unique_prefix();
    let provider = Provider::start().await;
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        let cfg = config(
            &prefix,
            REDIS_URL,
            vec![(
                "oa",
                account(TokenEndpoint::Stable, &provider.base_url, "not-the-secret"),
            )],
        );
        // With their refreshers: they try the account at start, and keep running.
        replicas.push(Replica::start(cfg).await);
    }
    let http = reqwest::Client::new();
    let barrier = Arc::new(Barrier::new(300));
    let mut requests = Vec::new();
    for i in 0..300 {
        let url = format!("{}/v1/tokens/oa", replicas[i % REPLICAS].url);
        let (http, barrier) = (http.clone(), barrier.clone());
        requests.push(tokio::spawn(async move {
            barrier.wait().await;
            let response = http
                .get(url)
                .bearer_auth(AUTH)
                .send()
                .await
                .expect("token request");
            let status = response.status().as_u16();
            (
                status,
                response.json::<serde_json::Value>().await.expect("json"),
            )
        }));
    }
    for request in requests {
        let (status, body) = within(request).await.expect("join");
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "account_misconfigured");
        assert_eq!(body["account"], "oa");
        assert_eq!(body["errcode"], 40125);
    }
    // Callers see a permanent error (the sender fails the delivery instead of retrying).
    for replica in &replicas {
        let err = within(replica.client().token("oa"))
            .await
            .expect_err("misconfigured");
        assert!(
            matches!(err, TokenClientError::Misconfigured { errcode: 40125, .. }),
            "{err:?}"
        );
        assert!(err.is_permanent());
        let (status, ready) = within(replica.get("/readyz")).await;
        assert_eq!(status, 503, "{ready}");
        assert_eq!(ready["misconfigured_accounts"][0]["account"], "oa");
        assert_eq!(ready["misconfigured_accounts"][0]["errcode"], 40125);
        let (status, _) = within(replica.get("/healthz")).await;
        assert_eq!(status, 200, "still alive");
        assert!(replica.is_running(), "no panic, no exit");
    }
    let calls = provider.sandbox.token_calls(APPID);
    assert_eq!(
        calls.stable, 1,
        "one attempt for 300 requests and 3 replicas (the next is due in a minute)"
    );
    for replica in replicas {
        replica.stop().await;
    }
    cleanup(&prefix).await;
}

/// Redis dies under a running replica: tokens keep being served from memory, a rejected token
/// is still replaced, a replica started during the outage works too, and once Redis is back the
/// token is written to it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_being_served_while_redis_is_down() {
    let prefix = unique_prefix();
    let mut redis = PrivateRedis::start().await;
    let provider = Provider::start().await;
    let redis_url = redis.url();
    let cfg = || {
        config(
            &prefix,
            &redis_url,
            vec![(
                "oa",
                account(TokenEndpoint::Stable, &provider.base_url, SECRET),
            )],
        )
    };
    let replica = Replica::start_api_only(cfg()).await;
    let (status, first) = within(replica.get("/v1/tokens/oa")).await;
    assert_eq!(status, 200, "{first}");
    let first = first["access_token"].as_str().expect("token").to_string();
    let key = format!("{prefix}token:oa");
    let stored: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis_at(&redis.url()).await)
        .await
        .expect("get");
    assert!(stored.is_some_and(|s| s.contains(&first)), "in redis");

    redis.kill().await;
    for _ in 0..50 {
        let (status, body) = within(replica.get("/v1/tokens/oa")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["access_token"].as_str(), Some(first.as_str()));
    }
    assert_eq!(provider.sandbox.token_calls(APPID).stable, 1, "from memory");
    let (status, ready) = within(replica.get("/readyz")).await;
    assert_eq!(status, 503);
    assert_eq!(ready["redis"], "unreachable");

    // The provider revokes the token; a sender reports it: replaced without Redis.
    provider.sandbox.invalidate_tokens(APPID);
    assert_eq!(provider.send_with(&first).await, 40001);
    let second = within(replica.client().report_rejected("oa", &first))
        .await
        .expect("refresh without redis");
    assert_ne!(second.access_token, first);
    assert_eq!(provider.send_with(&second.access_token).await, 0);

    // A replica started during the outage fetches on its own; stable_token hands it the
    // same token, so the replicas agree without Redis.
    let late = Replica::start_api_only(cfg()).await;
    let (status, body) = within(late.get("/v1/tokens/oa")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["access_token"].as_str(),
        Some(second.access_token.as_str())
    );
    assert_eq!(
        provider.sandbox.token_calls(APPID),
        TokenCalls {
            classic: 0,
            stable: 3,
            stable_forced: 1,
        }
    );

    // Redis comes back (empty): the next request finds it and writes the token from memory.
    redis.restart().await;
    let mut back = false;
    for _ in 0..50 {
        if within(replica.get("/readyz")).await.0 == 200 {
            back = true;
            break;
        }
    }
    assert!(back, "the replica reconnects to redis");
    let (status, body) = within(replica.get("/v1/tokens/oa")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["access_token"].as_str(),
        Some(second.access_token.as_str())
    );
    let stored: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis_at(&redis.url()).await)
        .await
        .expect("get");
    assert!(
        stored.is_some_and(|s| s.contains(&second.access_token)),
        "re-seeded from memory"
    );
    assert_eq!(provider.sandbox.token_calls(APPID).stable, 3);
    replica.stop().await;
    late.stop().await;
    redis.kill().await;
}

/// Classic `/cgi-bin/token`: a refresh invalidates the previous token only after the provider's
/// 5-minute overlap, so a sender still holding it keeps sending; once the overlap is over and
/// it is rejected, reporting it answers the current token without another fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_mode_the_old_token_works_during_the_overlap() {
    let prefix = unique_prefix();
    let provider = Provider::start().await;
    let replica = Replica::start_api_only(config(
        &prefix,
        REDIS_URL,
        vec![(
            "classic",
            account(TokenEndpoint::Classic, &provider.base_url, SECRET),
        )],
    ))
    .await;
    // A sender caches the first token.
    let sender = replica.client();
    let old = within(sender.token("classic")).await.expect("token");
    // Another sender reports it (say a stray rejection): the service fetches a new one, which
    // with /cgi-bin/token starts the old one's 5-minute overlap.
    let new = within(
        replica
            .client()
            .report_rejected("classic", &old.access_token),
    )
    .await
    .expect("new token");
    assert_ne!(new.access_token, old.access_token);
    assert_eq!(provider.sandbox.token_calls(APPID).classic, 2);

    // The first sender still uses its cached token, and WeChat still takes it.
    let cached = within(sender.token("classic")).await.expect("cached");
    assert_eq!(cached.access_token, old.access_token);
    for _ in 0..5 {
        assert_eq!(provider.send_with(&cached.access_token).await, 0);
    }
    assert_eq!(provider.send_with(&new.access_token).await, 0);

    // After the overlap the old token is rejected; reporting it gets the current token, with
    // no further fetch (compare-and-set: the old token is no longer the current one).
    provider
        .sandbox
        .advance_clock(std::time::Duration::from_secs(301));
    assert_eq!(provider.send_with(&old.access_token).await, 40001);
    let answer = within(sender.report_rejected("classic", &old.access_token))
        .await
        .expect("current token");
    assert_eq!(answer.access_token, new.access_token);
    assert_eq!(provider.send_with(&answer.access_token).await, 0);
    assert_eq!(
        provider.sandbox.token_calls(APPID),
        TokenCalls {
            classic: 2,
            stable: 0,
            stable_forced: 0,
        }
    );
    replica.stop().await;
    cleanup(&prefix).await;
}
