//! A fake of the providers' token endpoints with the semantics of shared/WECHAT.md:
//! `/cgi-bin/stable_token` (same token until 5 minutes before expiry; `force_refresh` reissues,
//! at most once per 30 s), `/cgi-bin/token` (every call issues a new token) and WeCom's
//! `/cgi-bin/gettoken` (same token while valid). It counts calls, can be told to answer given
//! error codes, and can hold its answers until released.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{oneshot, watch};

const LIFETIME: Duration = Duration::from_secs(7200);
const STABLE_RENEW_BEFORE: Duration = Duration::from_secs(300);
const FORCE_INTERVAL: Duration = Duration::from_secs(30);

/// A scripted answer, used once, in order, before the normal semantics apply.
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)]
pub enum Reply {
    Errcode(i64),
    Http500,
}

struct Issued {
    token: String,
    expires: Instant,
}

pub struct FakeState {
    appid: String,
    secret: String,
    pub stable_calls: AtomicUsize,
    pub stable_forced: AtomicUsize,
    pub classic_calls: AtomicUsize,
    pub wecom_calls: AtomicUsize,
    /// Every call that arrived, of any kind (for awaiting "the call is in flight").
    arrived: watch::Sender<usize>,
    hold: watch::Sender<bool>,
    script: Mutex<VecDeque<Reply>>,
    stable: Mutex<Option<Issued>>,
    last_force: Mutex<Option<Instant>>,
    wecom: Mutex<Option<Issued>>,
    seq: AtomicUsize,
}

pub struct FakeWeChat {
    pub base_url: String,
    pub state: Arc<FakeState>,
    _stop: oneshot::Sender<()>,
}

#[allow(dead_code)]
impl FakeWeChat {
    /// Starts the fake for one appid (corpid for WeCom) and secret.
    pub async fn start(appid: &str, secret: &str) -> Self {
        let state = Arc::new(FakeState {
            appid: appid.into(),
            secret: secret.into(),
            stable_calls: AtomicUsize::new(0),
            stable_forced: AtomicUsize::new(0),
            classic_calls: AtomicUsize::new(0),
            wecom_calls: AtomicUsize::new(0),
            arrived: watch::Sender::new(0),
            hold: watch::Sender::new(false),
            script: Mutex::new(VecDeque::new()),
            stable: Mutex::new(None),
            last_force: Mutex::new(None),
            wecom: Mutex::new(None),
            seq: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/cgi-bin/stable_token", post(stable_token))
            .route("/cgi-bin/token", get(classic_token))
            .route("/cgi-bin/gettoken", get(wecom_token))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake");
        let addr: SocketAddr = listener.local_addr().expect("fake addr");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            base_url: format!("http://{addr}"),
            state,
            _stop: stop,
        }
    }

    pub fn script(&self, replies: &[Reply]) {
        self.state
            .script
            .lock()
            .expect("script")
            .extend(replies.iter().copied());
    }

    /// While held, calls are counted but not answered.
    pub fn hold(&self, held: bool) {
        self.state.hold.send_replace(held);
    }

    /// Waits until at least `n` calls (of any kind) have arrived.
    pub async fn arrived(&self, n: usize) {
        let mut rx = self.state.arrived.subscribe();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|seen| *seen >= n))
            .await
            .expect("provider call did not arrive in time")
            .expect("fake stopped");
    }

    pub fn stable(&self) -> usize {
        self.state.stable_calls.load(Ordering::SeqCst)
    }
    pub fn forced(&self) -> usize {
        self.state.stable_forced.load(Ordering::SeqCst)
    }
    pub fn classic(&self) -> usize {
        self.state.classic_calls.load(Ordering::SeqCst)
    }
    pub fn wecom(&self) -> usize {
        self.state.wecom_calls.load(Ordering::SeqCst)
    }
    pub fn total(&self) -> usize {
        self.stable() + self.classic() + self.wecom()
    }
}

impl FakeState {
    fn new_token(&self, kind: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        format!("FAKE-{kind}-{}-{n:06}", "x".repeat(96))
    }

    /// Counts the call, waits while held, then answers a scripted reply if one is queued.
    async fn enter(&self) -> Option<Response> {
        self.arrived.send_modify(|n| *n += 1);
        let mut hold = self.hold.subscribe();
        let _ = hold.wait_for(|held| !*held).await;
        let scripted = self.script.lock().expect("script").pop_front();
        scripted.map(|reply| match reply {
            Reply::Errcode(code) => error(code, "scripted error"),
            Reply::Http500 => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        })
    }

    fn check(&self, appid: &str, secret: &str, bad_secret: i64) -> Option<Response> {
        if appid != self.appid {
            return Some(error(40013, "invalid appid"));
        }
        if secret != self.secret {
            return Some(error(bad_secret, "invalid appsecret"));
        }
        None
    }
}

fn error(errcode: i64, errmsg: &str) -> Response {
    Json(json!({"errcode": errcode, "errmsg": format!("{errmsg} rid: fake")})).into_response()
}

fn remaining(expires: Instant) -> u64 {
    expires.saturating_duration_since(Instant::now()).as_secs()
}

#[derive(Deserialize)]
struct StableRequest {
    grant_type: String,
    appid: String,
    secret: String,
    #[serde(default)]
    force_refresh: bool,
}

async fn stable_token(
    State(state): State<Arc<FakeState>>,
    Json(req): Json<StableRequest>,
) -> Response {
    state.stable_calls.fetch_add(1, Ordering::SeqCst);
    if req.force_refresh {
        state.stable_forced.fetch_add(1, Ordering::SeqCst);
    }
    if let Some(reply) = state.enter().await {
        return reply;
    }
    if req.grant_type != "client_credential" {
        return error(40002, "invalid grant_type");
    }
    if let Some(reply) = state.check(&req.appid, &req.secret, 40125) {
        return reply;
    }
    if req.force_refresh {
        let mut last = state.last_force.lock().expect("force");
        if last.is_some_and(|at| at.elapsed() < FORCE_INTERVAL) {
            return error(
                45011,
                "api minute-quota reach limit mustslower retry next minute",
            );
        }
        *last = Some(Instant::now());
    }
    let mut current = state.stable.lock().expect("stable");
    let reuse = !req.force_refresh
        && current
            .as_ref()
            .is_some_and(|t| remaining(t.expires) > STABLE_RENEW_BEFORE.as_secs());
    if !reuse {
        *current = Some(Issued {
            token: state.new_token("stable"),
            expires: Instant::now() + LIFETIME,
        });
    }
    let issued = current.as_ref().expect("issued");
    Json(json!({"access_token": issued.token, "expires_in": remaining(issued.expires)}))
        .into_response()
}

#[derive(Deserialize)]
struct ClassicQuery {
    grant_type: String,
    appid: String,
    secret: String,
}

async fn classic_token(
    State(state): State<Arc<FakeState>>,
    Query(q): Query<ClassicQuery>,
) -> Response {
    state.classic_calls.fetch_add(1, Ordering::SeqCst);
    if let Some(reply) = state.enter().await {
        return reply;
    }
    if q.grant_type != "client_credential" {
        return error(40002, "invalid grant_type");
    }
    if let Some(reply) = state.check(&q.appid, &q.secret, 40125) {
        return reply;
    }
    // Every call issues a new token (the previous one keeps working for 5 minutes).
    Json(json!({"access_token": state.new_token("classic"), "expires_in": LIFETIME.as_secs()}))
        .into_response()
}

#[derive(Deserialize)]
struct WecomQuery {
    corpid: String,
    corpsecret: String,
}

async fn wecom_token(State(state): State<Arc<FakeState>>, Query(q): Query<WecomQuery>) -> Response {
    state.wecom_calls.fetch_add(1, Ordering::SeqCst);
    if let Some(reply) = state.enter().await {
        return reply;
    }
    if let Some(reply) = state.check(&q.corpid, &q.corpsecret, 40001) {
        return reply;
    }
    let mut current = state.wecom.lock().expect("wecom");
    if current.as_ref().is_none_or(|t| t.expires <= Instant::now()) {
        *current = Some(Issued {
            token: state.new_token("wecom"),
            expires: Instant::now() + LIFETIME,
        });
    }
    let issued = current.as_ref().expect("issued");
    Json(
        json!({"errcode": 0, "errmsg": "ok", "access_token": issued.token,
                "expires_in": remaining(issued.expires)}),
    )
    .into_response()
}
