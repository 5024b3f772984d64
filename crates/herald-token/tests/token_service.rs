//! The token service against the real Redis at 127.0.0.1:6379 and a fake token endpoint.
//! Every test uses its own key prefix and deletes its keys at the end.

mod fake_wechat;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fake_wechat::{FakeWeChat, Reply};
use herald_config::{RedisSettings, TokenServiceClientSettings};
use herald_token::client::{TokenClient, TokenClientError};
use herald_token::{AccountConfig, AccountKind, TokenEndpoint, TokenService, TokenServiceConfig};
use serde_json::Value;
use tokio::sync::{Barrier, oneshot};

const REDIS_URL: &str = "redis://127.0.0.1:6379/";
const AUTH: &str = "test-bearer-secret";
const APPID: &str = "wxtest0000000001";
const SECRET: &str = "right-secret-value";
const WAIT: Duration = Duration::from_secs(20);

fn unique_prefix() -> String {
    format!("test-{}:", uuid::Uuid::new_v4())
}

fn account(kind: AccountKind, endpoint: TokenEndpoint, base_url: &str) -> AccountConfig {
    AccountConfig {
        kind,
        appid: APPID.into(),
        secret: Some(SECRET.into()),
        secret_file: None,
        agent_id: None,
        base_url: base_url.into(),
        token_endpoint: endpoint,
    }
}

fn config(prefix: &str, accounts: Vec<(&str, AccountConfig)>) -> TokenServiceConfig {
    TokenServiceConfig {
        listen: "127.0.0.1:0".into(),
        auth_token: AUTH.into(),
        redis: RedisSettings {
            url: REDIS_URL.into(),
            key_prefix: prefix.into(),
        },
        refresh_at: 0.8,
        accounts: accounts
            .into_iter()
            .map(|(name, account)| (name.to_string(), account))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn oa_config(prefix: &str, fake: &FakeWeChat) -> TokenServiceConfig {
    config(
        prefix,
        vec![(
            "oa",
            account(
                AccountKind::WechatOfficialAccount,
                TokenEndpoint::Stable,
                &fake.base_url,
            ),
        )],
    )
}

/// One running replica: `serve` with its refresher.
struct Replica {
    url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Replica {
    async fn start(config: TokenServiceConfig) -> Self {
        let service = TokenService::new(config).await.expect("service starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(service.serve(listener, async move {
            let _ = stopped.await;
        }));
        Self { url, stop, task }
    }

    /// Shuts the replica down (its refresher included), so nothing writes after the cleanup.
    async fn stop(self) {
        let _ = self.stop.send(());
        within(self.task)
            .await
            .expect("serve task")
            .expect("serve result");
    }

    fn client(&self) -> TokenClient {
        TokenClient::new(&TokenServiceClientSettings {
            url: self.url.clone(),
            auth_token: AUTH.into(),
        })
    }

    /// A raw authorised GET (no client cache in the way).
    async fn get(&self, path: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .bearer_auth(AUTH)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("the tests need Redis at 127.0.0.1:6379")
}

async fn cleanup(prefix: &str) {
    let mut conn = redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
}

async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.expect("timed out")
}

#[tokio::test]
async fn get_fetches_once_then_serves_from_redis() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    let replica = Replica::start(oa_config(&prefix, &fake)).await;

    let (status, first) = within(replica.get("/v1/tokens/oa")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["account"], "oa");
    let token = first["access_token"].as_str().expect("token").to_string();
    assert!(token.starts_with("FAKE-stable-"));
    for field in ["expires_at", "fetched_at"] {
        let text = first[field].as_str().expect(field);
        chrono::DateTime::parse_from_rfc3339(text).expect("RFC 3339");
    }

    let (status, second) = within(replica.get("/v1/tokens/oa")).await;
    assert_eq!(status, 200);
    assert_eq!(second["access_token"], first["access_token"]);
    assert_eq!(fake.stable(), 1, "the second GET must come from Redis");

    // The token is in Redis under the documented key, with a TTL of its remaining lifetime.
    let mut conn = redis().await;
    let raw: String = redis::cmd("GET")
        .arg(format!("{prefix}token:oa"))
        .query_async(&mut conn)
        .await
        .expect("token key");
    let stored: Value = serde_json::from_str(&raw).expect("json");
    assert_eq!(stored["access_token"].as_str(), Some(token.as_str()));
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}token:oa"))
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!(ttl > 7_000_000 && ttl <= 7_200_000, "ttl {ttl}");

    // The client caches: a second call answers the same token.
    let client = replica.client();
    let a = within(client.token("oa")).await.expect("client token");
    let b = within(client.token("oa")).await.expect("client token");
    assert_eq!(a.access_token, token);
    assert_eq!(b.access_token, token);
    assert_eq!(fake.stable(), 1);
    replica.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn storm_across_two_replicas_makes_one_provider_call() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    let a = Replica::start(oa_config(&prefix, &fake)).await;
    let b = Replica::start(oa_config(&prefix, &fake)).await;
    let (client_a, client_b) = (a.client(), b.client());

    let stale = within(client_a.token("oa")).await.expect("first token");
    assert_eq!(fake.stable(), 1);
    let before = fake.total();

    fake.hold(true);
    let barrier = Arc::new(Barrier::new(51));
    let mut callers = Vec::new();
    for i in 0..50 {
        let client = if i % 2 == 0 {
            client_a.clone()
        } else {
            client_b.clone()
        };
        let barrier = barrier.clone();
        let stale = stale.access_token.clone();
        callers.push(tokio::spawn(async move {
            barrier.wait().await;
            client.report_rejected("oa", &stale).await
        }));
    }
    barrier.wait().await;
    // The forced refresh is in flight, held by the fake.
    fake.arrived(before + 1).await;
    // Readers keep getting the still-valid token meanwhile.
    let (status, during) = within(b.get("/v1/tokens/oa")).await;
    assert_eq!(status, 200);
    assert_eq!(
        during["access_token"].as_str(),
        Some(stale.access_token.as_str())
    );
    fake.hold(false);

    let mut answers = Vec::new();
    for caller in callers {
        let answer = within(caller).await.expect("join").expect("new token");
        answers.push(answer.access_token);
    }
    let fresh = answers[0].clone();
    assert_ne!(fresh, stale.access_token);
    assert!(
        answers.iter().all(|t| *t == fresh),
        "every caller gets the same new token"
    );
    assert_eq!(fake.forced(), 1, "exactly one force_refresh");
    assert_eq!(fake.total(), before + 1, "exactly one provider call in all");

    // Both replicas now serve the new token from Redis.
    let (_, via_a) = within(a.get("/v1/tokens/oa")).await;
    let (_, via_b) = within(b.get("/v1/tokens/oa")).await;
    assert_eq!(via_a["access_token"].as_str(), Some(fresh.as_str()));
    assert_eq!(via_b["access_token"].as_str(), Some(fresh.as_str()));
    assert_eq!(fake.total(), before + 1);
    a.stop().await;
    b.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn invalidating_a_superseded_token_calls_nobody() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    let replica = Replica::start(oa_config(&prefix, &fake)).await;
    let client = replica.client();

    let current = within(client.token("oa")).await.expect("token");
    let answer = within(client.report_rejected("oa", "an-older-token-that-is-long-gone"))
        .await
        .expect("answer");
    assert_eq!(answer.access_token, current.access_token);
    assert_eq!(fake.total(), 1);
    replica.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn force_refresh_at_most_once_per_30_seconds() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    let replica = Replica::start(oa_config(&prefix, &fake)).await;
    let client = replica.client();

    let first = within(client.token("oa")).await.expect("token");
    let second = within(client.report_rejected("oa", &first.access_token))
        .await
        .expect("forced");
    assert_ne!(second.access_token, first.access_token);
    assert_eq!((fake.stable(), fake.forced()), (2, 1));

    // Rejected again within 30 s: a normal stable_token call, which answers the current token.
    let third = within(client.report_rejected("oa", &second.access_token))
        .await
        .expect("normal");
    assert_eq!(third.access_token, second.access_token);
    assert_eq!((fake.stable(), fake.forced()), (3, 1));

    // The marker is shared: another replica does not force either.
    let other = Replica::start(oa_config(&prefix, &fake)).await;
    let fourth = within(other.client().report_rejected("oa", &third.access_token))
        .await
        .expect("normal");
    assert_eq!(fourth.access_token, third.access_token);
    assert_eq!((fake.stable(), fake.forced()), (4, 1));
    replica.stop().await;
    other.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn config_error_is_permanent_not_retried_and_reported() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, "the-real-secret").await;
    let replica = Replica::start(oa_config(&prefix, &fake)).await;

    let (status, body) = within(replica.get("/v1/tokens/oa")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "account_misconfigured");
    assert_eq!(body["account"], "oa");
    assert_eq!(body["errcode"], 40125);
    assert_eq!(fake.total(), 1, "a config error is not retried");

    // Asked again: answered from the error state, no provider call (at most one a minute).
    let err = within(replica.client().token("oa"))
        .await
        .expect_err("misconfigured");
    assert!(
        matches!(err, TokenClientError::Misconfigured { errcode: 40125, .. }),
        "{err:?}"
    );
    assert!(err.is_permanent());
    let (status, _) = within(replica.get("/v1/tokens/oa")).await;
    assert_eq!(status, 503);
    assert_eq!(fake.total(), 1);

    let (status, ready) = within(replica.get("/readyz")).await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["misconfigured_accounts"][0]["account"], "oa");
    assert_eq!(ready["misconfigured_accounts"][0]["errcode"], 40125);
    assert_eq!(ready["redis"], "ok");

    // Another replica sees the error in Redis and does not call the provider either.
    let other = Replica::start(oa_config(&prefix, &fake)).await;
    let (status, body) = within(other.get("/v1/tokens/oa")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["errcode"], 40125);
    assert_eq!(fake.total(), 1);
    replica.stop().await;
    other.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn transient_errors_are_retried() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    fake.script(&[Reply::Errcode(-1), Reply::Http500]);
    let replica = Replica::start(oa_config(&prefix, &fake)).await;

    let (status, body) = within(replica.get("/v1/tokens/oa")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].as_str().is_some());
    assert_eq!(fake.total(), 3, "-1, then 500, then success");

    let (status, ready) = within(replica.get("/readyz")).await;
    assert_eq!(status, 200, "{ready}");
    replica.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn unreachable_provider_is_unavailable_not_misconfigured() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    fake.script(&[Reply::Errcode(-1); 4]);
    let replica = Replica::start(oa_config(&prefix, &fake)).await;

    let (status, body) = within(replica.get("/v1/tokens/oa")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "provider_unavailable");
    assert_eq!(fake.total(), 4, "bounded: four tries");
    let later = within(replica.client().token("oa"))
        .await
        .expect("the scripted errors are used up, now it works");
    assert!(!later.access_token.is_empty());
    replica.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn redis_unreachable_still_serves_tokens() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    let mut cfg = oa_config(&prefix, &fake);
    cfg.redis.url = "redis://127.0.0.1:1/".into();
    let replica = Replica::start(cfg).await;
    let client = replica.client();

    let (status, first) = within(replica.get("/v1/tokens/oa")).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = within(replica.get("/v1/tokens/oa")).await;
    assert_eq!(status, 200);
    assert_eq!(first["access_token"], second["access_token"]);
    assert_eq!(fake.total(), 1, "the second GET is served from memory");

    let stale = first["access_token"].as_str().expect("token").to_string();
    let fresh = within(client.report_rejected("oa", &stale))
        .await
        .expect("refresh without redis");
    assert_ne!(fresh.access_token, stale);
    assert_eq!(fake.forced(), 1);

    let (status, ready) = within(replica.get("/readyz")).await;
    assert_eq!(status, 503);
    assert_eq!(ready["redis"], "unreachable");
    replica.stop().await;
}

#[tokio::test]
async fn auth_and_unknown_accounts() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    let replica = Replica::start(oa_config(&prefix, &fake)).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/tokens/oa", replica.url);

    let none = within(http.get(&url).send()).await.expect("request");
    assert_eq!(none.status().as_u16(), 401);
    let wrong = within(http.get(&url).bearer_auth("not-the-secret").send())
        .await
        .expect("request");
    assert_eq!(wrong.status().as_u16(), 401);
    let post = within(
        http.post(format!("{url}/invalidate"))
            .json(&serde_json::json!({"access_token": "x"}))
            .send(),
    )
    .await
    .expect("request");
    assert_eq!(post.status().as_u16(), 401);

    let (status, body) = within(replica.get("/v1/tokens/nope")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "unknown_account");
    assert_eq!(body["account"], "nope");
    let err = within(replica.client().token("nope"))
        .await
        .expect_err("unknown");
    assert!(matches!(err, TokenClientError::UnknownAccount(ref a) if a == "nope"));
    assert!(err.is_permanent());

    let bad_client = TokenClient::new(&TokenServiceClientSettings {
        url: replica.url.clone(),
        auth_token: "wrong".into(),
    });
    let err = within(bad_client.token("oa")).await.expect_err("refused");
    assert!(matches!(err, TokenClientError::Unauthorized));

    let health = within(http.get(format!("{}/healthz", replica.url)).send())
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);

    let bad_body = within(
        http.post(format!("{url}/invalidate"))
            .bearer_auth(AUTH)
            .body("not json")
            .send(),
    )
    .await
    .expect("request");
    assert_eq!(bad_body.status().as_u16(), 400);
    // (The refresher's warm-up may have fetched the "oa" token meanwhile.)
    assert!(fake.total() <= 1);
    replica.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn classic_and_wecom_endpoints() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    let cfg = config(
        &prefix,
        vec![
            (
                "classic",
                account(
                    AccountKind::WechatMiniProgram,
                    TokenEndpoint::Classic,
                    &fake.base_url,
                ),
            ),
            (
                "wecom",
                account(AccountKind::WecomApp, TokenEndpoint::Stable, &fake.base_url),
            ),
        ],
    );
    let replica = Replica::start(cfg).await;
    let client = replica.client();

    let first = within(client.token("classic")).await.expect("classic");
    assert!(first.access_token.starts_with("FAKE-classic-"));
    let second = within(client.report_rejected("classic", &first.access_token))
        .await
        .expect("classic again");
    assert_ne!(second.access_token, first.access_token);
    assert_eq!(fake.classic(), 2);

    let w1 = within(client.token("wecom")).await.expect("wecom");
    assert!(w1.access_token.starts_with("FAKE-wecom-"));
    let w2 = within(client.report_rejected("wecom", &w1.access_token))
        .await
        .expect("wecom again");
    assert_eq!(fake.wecom(), 2, "gettoken is called again");
    assert_eq!(
        w2.access_token, w1.access_token,
        "WeCom answers the valid token"
    );
    assert_eq!((fake.stable(), fake.forced()), (0, 0));
    replica.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn wecom_wrong_secret_is_a_config_error() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, "another-secret").await;
    let cfg = config(
        &prefix,
        vec![(
            "wecom",
            account(AccountKind::WecomApp, TokenEndpoint::Stable, &fake.base_url),
        )],
    );
    let replica = Replica::start(cfg).await;
    let (status, body) = within(replica.get("/v1/tokens/wecom")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["errcode"], 40001);
    assert_eq!(fake.wecom(), 1);
    replica.stop().await;
    cleanup(&prefix).await;
}

#[tokio::test]
async fn waits_for_another_replica_holding_the_lock() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    let service = TokenService::new(oa_config(&prefix, &fake))
        .await
        .expect("service");
    let mut conn = redis().await;
    let lock = format!("{prefix}token-lock:oa");
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("another-replica")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut conn)
        .await
        .expect("lock");

    let waiting = tokio::spawn({
        let service = service.clone();
        async move { service.token("oa").await }
    });
    // "The other replica" stores its token, then releases the lock.
    let now = chrono::Utc::now();
    let theirs = serde_json::json!({
        "access_token": "TOKEN-WRITTEN-BY-ANOTHER-REPLICA-000001",
        "expires_at": now + chrono::Duration::seconds(7200),
        "fetched_at": now,
    });
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}token:oa"))
        .arg(theirs.to_string())
        .arg("PX")
        .arg(7_200_000)
        .query_async(&mut conn)
        .await
        .expect("token");
    let _: () = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut conn)
        .await
        .expect("unlock");

    let got = within(waiting).await.expect("join").expect("token");
    assert_eq!(got.access_token, "TOKEN-WRITTEN-BY-ANOTHER-REPLICA-000001");
    assert_eq!(
        fake.total(),
        0,
        "no provider call while another replica refreshes"
    );

    // A lock that disappears without a new token (its holder failed): this replica then
    // refreshes by itself.
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("another-replica")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut conn)
        .await
        .expect("lock");
    let fresh = service.clone();
    let waiting = tokio::spawn(async move {
        fresh
            .invalidate("oa", "TOKEN-WRITTEN-BY-ANOTHER-REPLICA-000001")
            .await
    });
    let _: () = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut conn)
        .await
        .expect("unlock");
    let got = within(waiting).await.expect("join").expect("token");
    assert!(got.access_token.starts_with("FAKE-stable-"));
    assert_eq!((fake.total(), fake.forced()), (1, 1));
    cleanup(&prefix).await;
}

#[tokio::test]
async fn proactive_refresh_renews_tokens_past_refresh_at() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    let mut cfg = config(
        &prefix,
        vec![(
            "classic",
            account(
                AccountKind::WechatOfficialAccount,
                TokenEndpoint::Classic,
                &fake.base_url,
            ),
        )],
    );
    // Any token is past this share of its lifetime at once.
    cfg.refresh_at = 1e-9;
    let service = TokenService::new(cfg).await.expect("service");

    // Missing tokens are fetched by the refresher too (warm-up).
    within(service.refresh_due()).await;
    assert_eq!(fake.classic(), 1);
    let first = within(service.token("classic")).await.expect("token");
    within(service.refresh_due()).await;
    assert_eq!(fake.classic(), 2);
    let second = within(service.token("classic")).await.expect("token");
    assert_ne!(second.access_token, first.access_token);

    // With the default share, a fresh token is left alone.
    let mut cfg = config(
        &prefix,
        vec![(
            "classic",
            account(
                AccountKind::WechatOfficialAccount,
                TokenEndpoint::Classic,
                &fake.base_url,
            ),
        )],
    );
    cfg.refresh_at = 0.8;
    let patient = TokenService::new(cfg).await.expect("service");
    within(patient.refresh_due()).await;
    assert_eq!(fake.classic(), 2);
    cleanup(&prefix).await;
}

#[tokio::test]
async fn secret_file_and_validation() {
    let prefix = unique_prefix();
    let fake = FakeWeChat::start(APPID, SECRET).await;
    let dir = std::env::temp_dir().join(format!("herald-token-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("secret");
    std::fs::write(&file, format!("{SECRET}\n")).expect("write secret");

    let mut acct = account(
        AccountKind::WechatOfficialAccount,
        TokenEndpoint::Stable,
        &fake.base_url,
    );
    acct.secret = None;
    acct.secret_file = Some(file.clone());
    let service = TokenService::new(config(&prefix, vec![("oa", acct.clone())]))
        .await
        .expect("secret from file");
    let token = within(service.token("oa")).await.expect("token");
    assert!(!token.access_token.is_empty());

    acct.secret = Some(SECRET.into());
    let both = TokenService::new(config(&prefix, vec![("oa", acct.clone())])).await;
    assert!(both.is_err(), "secret and secret_file together are refused");
    acct.secret = None;
    acct.secret_file = None;
    let neither = TokenService::new(config(&prefix, vec![("oa", acct)])).await;
    assert!(neither.is_err());

    let printed = format!(
        "{:?}",
        config(
            &prefix,
            vec![(
                "oa",
                account(
                    AccountKind::WechatOfficialAccount,
                    TokenEndpoint::Stable,
                    &fake.base_url
                )
            )]
        )
    );
    assert!(!printed.contains(SECRET), "{printed}");
    assert!(!printed.contains(AUTH), "{printed}");
    let _ = std::fs::remove_dir_all(&dir);
    cleanup(&prefix).await;
}
