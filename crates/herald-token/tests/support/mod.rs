//! Shared by the test binaries that use the real provider sandbox (`herald-sandbox`) and, for
//! the Redis-outage test, a private `redis-server` child process.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use herald_config::{RedisSettings, TokenServiceClientSettings};
use herald_sandbox::{Sandbox, SandboxApp, SandboxConfig};
use herald_token::client::TokenClient;
use herald_token::{AccountConfig, AccountKind, TokenEndpoint, TokenService, TokenServiceConfig};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";
pub const AUTH: &str = "test-bearer-secret";
pub const WAIT: Duration = Duration::from_secs(20);
/// The sandbox's demo app: appid, secret and a template to send with.
pub const APPID: &str = "wxdemo0000000001";
pub const SECRET: &str = "demo-secret";
pub const OPENID: &str = "oTokenTest000000000000000001";

pub fn unique_prefix() -> String {
    format!("test-{}:", uuid::Uuid::new_v4())
}

pub async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.expect("timed out")
}

/// The real provider sandbox on a free port, without callbacks.
pub struct Provider {
    pub sandbox: Sandbox,
    pub base_url: String,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Provider {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(customize: impl FnOnce(&mut SandboxConfig)) -> Self {
        let mut app = SandboxApp::demo();
        app.callback_url = None;
        let mut config = SandboxConfig {
            listen: "127.0.0.1:0".into(),
            apps: vec![app],
            callback_delay_ms: 0,
            ..SandboxConfig::default()
        };
        customize(&mut config);
        let sandbox = Sandbox::new(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sandbox");
        let base_url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(sandbox.clone().serve(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            sandbox,
            base_url,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("http client"),
            _stop: stop,
        }
    }

    /// Sends the demo template with `token`; answers WeChat's errcode.
    pub async fn send_with(&self, token: &str) -> i64 {
        let answer: Value = self
            .http
            .post(format!("{}/cgi-bin/message/template/send", self.base_url))
            .query(&[("access_token", token)])
            .json(&json!({
                "touser": OPENID,
                "template_id": "tmpl_order_shipped",
                "data": {"order_id": {"value": "A-1"}, "carrier": {"value": "SF"},
                         "eta": {"value": "soon"}},
            }))
            .send()
            .await
            .expect("send request")
            .json()
            .await
            .expect("send answer");
        answer["errcode"].as_i64().expect("errcode")
    }
}

pub fn account(endpoint: TokenEndpoint, base_url: &str, secret: &str) -> AccountConfig {
    AccountConfig {
        kind: AccountKind::WechatOfficialAccount,
        appid: APPID.into(),
        secret: Some(secret.into()),
        secret_file: None,
        agent_id: None,
        base_url: base_url.into(),
        token_endpoint: endpoint,
    }
}

pub fn config(
    prefix: &str,
    redis_url: &str,
    accounts: Vec<(&str, AccountConfig)>,
) -> TokenServiceConfig {
    TokenServiceConfig {
        listen: "127.0.0.1:0".into(),
        auth_token: AUTH.into(),
        redis: RedisSettings {
            url: redis_url.into(),
            key_prefix: prefix.into(),
        },
        refresh_at: 0.8,
        accounts: accounts
            .into_iter()
            .map(|(name, account)| (name.to_string(), account))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// One replica on a free port: the HTTP API, with or without the background refresher.
pub struct Replica {
    pub url: String,
    pub service: TokenService,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Replica {
    /// `serve`: the API and the background refresher.
    pub async fn start(config: TokenServiceConfig) -> Self {
        let service = TokenService::new(config).await.expect("service starts");
        let (listener, url) = listen().await;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(service.clone().serve(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            url,
            service,
            stop,
            task,
        }
    }

    /// The API only: no background refresher racing the test's own requests.
    pub async fn start_api_only(config: TokenServiceConfig) -> Self {
        let service = TokenService::new(config).await.expect("service starts");
        let (listener, url) = listen().await;
        let (stop, stopped) = oneshot::channel::<()>();
        let router = service.router();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Self {
            url,
            service,
            stop,
            task,
        }
    }

    /// Whether the server task is still running (it ends only on shutdown or a panic).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        within(self.task)
            .await
            .expect("serve task")
            .expect("serve result");
    }

    pub fn client(&self) -> TokenClient {
        TokenClient::new(&TokenServiceClientSettings {
            url: self.url.clone(),
            auth_token: AUTH.into(),
        })
    }

    /// A raw authorised GET (no client cache in the way).
    pub async fn get(&self, path: &str) -> (u16, Value) {
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

async fn listen() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    (listener, url)
}

pub async fn redis_at(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis reachable")
}

/// Deletes every key under `prefix` in the shared Redis.
pub async fn cleanup(prefix: &str) {
    let mut conn = redis_at(REDIS_URL).await;
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

/// A `redis-server` of the test's own (never the shared one on 6379), killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts on a free port and returns once the server says it accepts connections.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("herald-token-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut redis = Self {
            port,
            dir,
            child: None,
        };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// (Re)starts the server on the same port; waits for "Ready to accept connections".
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for this test");
        let stdout = child.stdout.take().expect("piped stdout");
        let ready = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match lines.read_line(&mut line) {
                    Ok(0) | Err(_) => return false,
                    Ok(_) if line.contains("Ready to accept connections") => break,
                    Ok(_) => {}
                }
            }
            // Keep draining the log so the server never blocks on a full pipe.
            std::thread::spawn(move || {
                let _ = lines.read_to_end(&mut Vec::new());
            });
            true
        });
        self.child = Some(child);
        let ready = within(ready).await.expect("reader");
        assert!(ready, "redis-server on port {} did not start", self.port);
    }

    /// Kills the server and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            within(tokio::task::spawn_blocking(move || {
                let _ = child.kill();
                let _ = child.wait();
            }))
            .await
            .expect("redis-server reaped");
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
