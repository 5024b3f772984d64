use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use herald_sandbox::{Sandbox, SandboxApp, SandboxConfig};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

pub const APPID: &str = "wxdemo0000000001";
pub const SECRET: &str = "demo-secret";
pub const TEMPLATE: &str = "tmpl_order_shipped";
pub const OPENID: &str = "oTEST0000000000000000000001";
pub const CALLBACK_TOKEN: &str = "demo-callback-token";

/// The demo app, no callback URL (tests that want callbacks point it at a receiver), no delay.
pub fn config() -> SandboxConfig {
    let mut app = SandboxApp::demo();
    app.callback_url = None;
    SandboxConfig {
        listen: "127.0.0.1:0".into(),
        apps: vec![app],
        callback_delay_ms: 0,
        callback_retry_interval_ms: 20,
        ..SandboxConfig::default()
    }
}

pub struct Running {
    pub sandbox: Sandbox,
    pub base: String,
    pub http: reqwest::Client,
    _shutdown: oneshot::Sender<()>,
}

pub async fn start(config: SandboxConfig) -> Running {
    let sandbox = Sandbox::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (shutdown, stopped) = oneshot::channel::<()>();
    let server = sandbox.clone();
    tokio::spawn(async move {
        let _ = server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await;
    });
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    Running {
        sandbox,
        base,
        http,
        _shutdown: shutdown,
    }
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get_token(&self, appid: &str, secret: &str) -> Value {
        self.http
            .get(self.url("/cgi-bin/token"))
            .query(&[
                ("grant_type", "client_credential"),
                ("appid", appid),
                ("secret", secret),
            ])
            .send()
            .await
            .expect("token request")
            .json()
            .await
            .expect("token json")
    }

    /// A fresh /cgi-bin/token token for the demo app.
    pub async fn token(&self) -> String {
        let answer = self.get_token(APPID, SECRET).await;
        answer["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    pub async fn stable(&self, body: Value) -> Value {
        self.http
            .post(self.url("/cgi-bin/stable_token"))
            .json(&body)
            .send()
            .await
            .expect("stable_token request")
            .json()
            .await
            .expect("stable_token json")
    }

    pub async fn stable_token(&self, force_refresh: bool) -> Value {
        self.stable(json!({
            "grant_type": "client_credential", "appid": APPID, "secret": SECRET,
            "force_refresh": force_refresh,
        }))
        .await
    }

    pub async fn send(&self, token: &str, body: &Value) -> Value {
        self.http
            .post(self.url("/cgi-bin/message/template/send"))
            .query(&[("access_token", token)])
            .json(body)
            .send()
            .await
            .expect("send request")
            .json()
            .await
            .expect("send json")
    }
}

/// A valid template message for the demo app.
pub fn message(openid: &str) -> Value {
    json!({
        "touser": openid,
        "template_id": TEMPLATE,
        "url": "https://example.com/orders/1",
        "data": {
            "order_id": {"value": "A-1001", "color": "#173177"},
            "carrier": {"value": "SF Express"},
            "eta": {"value": "tomorrow"},
        },
    })
}

pub fn errcode(answer: &Value) -> i64 {
    answer["errcode"].as_i64().expect("errcode")
}

/// One POST as a callback receiver saw it.
#[derive(Debug)]
pub struct Received {
    pub query: HashMap<String, String>,
    pub content_type: Option<String>,
    pub body: String,
}

/// A tiny callback receiver answering `status` / `reply`; every POST arrives on the channel.
pub async fn receiver(
    status: StatusCode,
    reply: &'static str,
) -> (String, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let tx = Arc::new(tx);
    let app = axum::Router::new()
        .route(
            "/callback",
            post(
                move |State(tx): State<Arc<mpsc::UnboundedSender<Received>>>,
                      Query(query): Query<HashMap<String, String>>,
                      headers: HeaderMap,
                      body: String| async move {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let _ = tx.send(Received {
                        query,
                        content_type,
                        body,
                    });
                    (status, reply)
                },
            ),
        )
        .with_state(tx);
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let url = format!("http://{}/callback", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, rx)
}
