//! A fake of WeChat's Official Account HTTP API for Herald's tests and dev stack.
//!
//! It speaks the real wire formats and error codes (see `WECHAT.md`): access tokens from
//! `/cgi-bin/token` and `/cgi-bin/stable_token`, template messages on
//! `/cgi-bin/message/template/send`, and the signed `TEMPLATESENDJOBFINISH` callback POSTed to
//! the app's server URL afterwards. Tests drive it in-process through [`Sandbox`], or over HTTP
//! through the `/_sandbox/*` control routes.

mod callbacks;
mod clock;
mod config;
mod control;
mod faults;
mod log;
mod robots;
mod sms;
mod subscribe;
mod template;
mod tokens;
mod wecom;
mod wx_error;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use callbacks::CallbackAttempt;
pub use config::{CallbackMode, SandboxApp, SandboxConfig, SandboxTemplate};
pub use faults::{Fault, FaultRates};
pub use log::LoggedRequest;
pub use robots::{RobotKind, RobotMessage, SandboxRobot};
pub use sms::{
    SandboxSmsAccount, SmsMessage, SmsProvider, SmsReceipt, SmsReceiptAttempt, SmsRequest,
};
pub use template::AcceptedSend;
pub use tokens::TokenCalls;
pub use wecom::{SandboxAgent, SandboxCorp, WecomMessage};

use clock::Clock;
use wx_error::WxError;

/// The WeChat paths the sandbox serves, as Herald's sender calls them.
pub mod paths {
    pub const TOKEN: &str = "/cgi-bin/token";
    pub const STABLE_TOKEN: &str = "/cgi-bin/stable_token";
    pub const TEMPLATE_SEND: &str = "/cgi-bin/message/template/send";
    /// Official Account subscribe messages.
    pub const SUBSCRIBE_BIZSEND: &str = "/cgi-bin/message/subscribe/bizsend";
    /// Mini program subscribe messages.
    pub const SUBSCRIBE_SEND: &str = "/cgi-bin/message/subscribe/send";
    /// WeCom group robots (`?key=`).
    pub const WECOM_ROBOT: &str = "/cgi-bin/webhook/send";
    /// DingTalk custom robots (`?access_token=&timestamp=&sign=`).
    pub const DINGTALK_ROBOT: &str = "/robot/send";
    /// Feishu custom robots; the hook's token follows.
    pub const FEISHU_ROBOT: &str = "/open-apis/bot/v2/hook";
    /// WeCom application tokens.
    pub const WECOM_GETTOKEN: &str = "/cgi-bin/gettoken";
    /// WeCom application messages.
    pub const WECOM_MESSAGE_SEND: &str = "/cgi-bin/message/send";
    /// Tencent Cloud SMS and Aliyun SMS (API 3.0 and RPC): both at the root, as on their own
    /// hosts (`X-TC-Action` tells Tencent's apart).
    pub const SMS: &str = "/";
}

/// The sandbox: cheap to clone, all clones share one state.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    config: SandboxConfig,
    clock: Clock,
    http: reqwest::Client,
    state: Mutex<State>,
    /// Bumped on every logged request, so waiters wake without polling.
    requests_changed: watch::Sender<u64>,
    /// Bumped on every recorded callback attempt.
    callbacks_changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    apps: BTreeMap<String, SandboxApp>,
    tokens: tokens::TokenStore,
    sends: template::SendStore,
    consents: subscribe::Consents,
    /// Robots by token.
    robot_configs: HashMap<String, robots::SandboxRobot>,
    robots: robots::RobotState,
    /// WeCom organisations by corpid.
    wecom_corps: HashMap<String, wecom::SandboxCorp>,
    wecom: wecom::WecomState,
    /// SMS accounts, messages, receipts.
    sms: sms::SmsState,
    /// Per path: errcodes to answer before behaving normally again.
    injected: HashMap<String, VecDeque<i64>>,
    /// TEMPLATESENDJOBFINISH status per openid; absent means "success".
    callback_status: HashMap<String, String>,
    requests: log::RequestLog,
    callbacks: VecDeque<CallbackAttempt>,
    /// Per path: transport faults for the next calls.
    faults: faults::Faults,
}

/// Oldest callback attempts are dropped past this, so a long-running dev sandbox stays bounded.
const MAX_CALLBACKS: usize = 10_000;

impl Sandbox {
    pub fn new(config: SandboxConfig) -> Self {
        let wecom_corps = config
            .wecom_corps
            .iter()
            .map(|corp| (corp.corpid.clone(), corp.clone()))
            .collect();
        let robot_configs = config
            .robots
            .iter()
            .map(|robot| (robot.token.clone(), robot.clone()))
            .collect();
        let sms_accounts = config
            .sms_accounts
            .iter()
            .map(|account| (account.key_id.clone(), account.clone()))
            .collect();
        let apps = config
            .apps
            .iter()
            .map(|app| (app.appid.clone(), app.clone()))
            .collect();
        // Callbacks go to Herald on localhost or the compose network, never through a proxy.
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap_or_else(|err| {
                tracing::warn!(%err, "custom HTTP client failed to build, using the default");
                reqwest::Client::new()
            });
        Self {
            inner: Arc::new(Inner {
                config,
                clock: Clock::default(),
                http,
                state: Mutex::new(State {
                    apps,
                    robot_configs,
                    wecom_corps,
                    sms: sms::SmsState::new(sms_accounts),
                    ..State::default()
                }),
                requests_changed: watch::Sender::new(0),
                callbacks_changed: watch::Sender::new(0),
            }),
        }
    }

    /// Every route, state attached: the WeChat API (logged) and `/_sandbox/*` (not logged).
    pub fn router(&self) -> Router {
        let wechat = Router::new()
            .route(paths::TOKEN, get(tokens::token))
            .route(paths::STABLE_TOKEN, post(tokens::stable_token))
            .route(paths::TEMPLATE_SEND, post(template::send))
            .route(paths::SUBSCRIBE_BIZSEND, post(subscribe::bizsend))
            .route(paths::SUBSCRIBE_SEND, post(subscribe::miniprogram_send))
            .route(paths::DINGTALK_ROBOT, post(robots::dingtalk))
            .route(paths::WECOM_ROBOT, post(robots::wecom))
            .route(paths::WECOM_GETTOKEN, get(wecom::gettoken))
            .route(paths::WECOM_MESSAGE_SEND, post(wecom::send))
            .route(paths::SMS, get(sms::root).post(sms::root))
            .route(
                &format!("{}/{{token}}", paths::FEISHU_ROBOT),
                post(robots::feishu),
            )
            .fallback(log::not_found)
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                log::record,
            ));
        wechat
            .merge(control::routes())
            .merge(sms::control_routes())
            .with_state(self.clone())
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "WeChat sandbox listening");
        }
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// The request log, oldest first (secrets redacted).
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.lock().requests.all()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// Resolves as soon as at least `n` logged requests have this path; at `timeout`, returns
    /// whatever matched so far.
    pub async fn wait_for_requests(
        &self,
        path: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<LoggedRequest> {
        let mut changed = self.inner.requests_changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Subscribed before looking, so a request logged in between still wakes us.
            let found = self.lock().requests.matching(path);
            if found.len() >= n {
                return found;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.lock().requests.matching(path),
            }
        }
    }

    /// Points an app's callbacks elsewhere (`None` stops them). Unknown appids are ignored.
    pub fn set_callback_url(&self, appid: &str, url: Option<String>) {
        match self.lock().apps.get_mut(appid) {
            Some(app) => app.callback_url = url,
            None => tracing::warn!(appid, "set_callback_url: no such app"),
        }
    }

    /// Adds an app, replacing the one with the same appid. Tokens already issued stay valid.
    pub fn add_app(&self, app: SandboxApp) {
        self.lock().apps.insert(app.appid.clone(), app);
    }

    /// The next calls to `path` answer these errcodes (WeChat's errmsg texts), one per call in
    /// order, then normal behaviour resumes. They come before every check except, on template
    /// send, the presence of `access_token`. Calls queue up behind earlier injections; an empty
    /// list clears the queue; errcode 0 lets that one call through normally.
    pub fn inject_errors(&self, path: &str, errcodes: Vec<i64>) {
        let mut state = self.lock();
        if errcodes.is_empty() {
            state.injected.remove(path);
        } else {
            state
                .injected
                .entry(path.to_owned())
                .or_default()
                .extend(errcodes);
        }
    }

    /// Status reported in TEMPLATESENDJOBFINISH for this openid ("success" unless set),
    /// e.g. "failed:user block" or "failed: system failed".
    pub fn set_callback_status(&self, openid: &str, status: &str) {
        self.lock()
            .callback_status
            .insert(openid.to_owned(), status.to_owned());
    }

    /// Every callback POST attempted, oldest first.
    pub fn callbacks(&self) -> Vec<CallbackAttempt> {
        self.lock().callbacks.iter().cloned().collect()
    }

    /// Resolves as soon as at least `n` callback attempts have been recorded; at `timeout`,
    /// returns what there is.
    pub async fn wait_for_callbacks(&self, n: usize, timeout: Duration) -> Vec<CallbackAttempt> {
        let mut changed = self.inner.callbacks_changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = self.callbacks();
            if found.len() >= n {
                return found;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.callbacks(),
            }
        }
    }

    /// Test knob: every token of `appid` that still works answers 40001 from now on, as if
    /// WeChat had revoked them. The next token call issues a new one. Returns how many.
    pub fn invalidate_tokens(&self, appid: &str) -> usize {
        let now = self.clock().now();
        let count = self.lock().tokens.invalidate(appid, now);
        tracing::info!(appid, count, "tokens invalidated on command");
        count
    }

    /// Test knob: every token of `appid` not yet expired expires now (42001 from now on). The
    /// next token call issues a new one. Returns how many.
    pub fn expire_tokens(&self, appid: &str) -> usize {
        let now = self.clock().now();
        let count = self.lock().tokens.expire(appid, now);
        tracing::info!(appid, count, "tokens expired on command");
        count
    }

    /// How often `/cgi-bin/token` and `/cgi-bin/stable_token` were called for `appid`, refused
    /// calls included.
    pub fn token_calls(&self, appid: &str) -> TokenCalls {
        self.lock().tokens.calls(appid)
    }

    /// Moves the sandbox's clock forward (token expiry, grace periods, quota windows,
    /// client_msg_id window). Real timers (callback delay and retries) are not affected.
    pub fn advance_clock(&self, by: Duration) {
        self.inner.clock.advance(by);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The next injected errcode for `path`, if any (0 means: this call behaves normally).
    /// What every token-guarded API call does first: take the `access_token` (41001 when
    /// missing), then answer an injected error for `path` if one is queued.
    fn admit_call(
        &self,
        path: &str,
        query: Result<
            axum::extract::Query<HashMap<String, String>>,
            axum::extract::rejection::QueryRejection,
        >,
    ) -> Result<String, WxError> {
        let token = query
            .ok()
            .and_then(|axum::extract::Query(mut query)| query.remove("access_token"))
            .filter(|token| !token.is_empty());
        let Some(token) = token else {
            return Err(WxError::new(wx_error::ACCESS_TOKEN_MISSING));
        };
        if let Some(err) = self.take_injected(path) {
            tracing::info!(%err, path, "answering injected error");
            return Err(err);
        }
        Ok(token)
    }

    fn take_injected(&self, path: &str) -> Option<WxError> {
        let mut state = self.lock();
        let queue = state.injected.get_mut(path)?;
        let code = queue.pop_front();
        if queue.is_empty() {
            state.injected.remove(path);
        }
        code.filter(|&code| code != 0).map(WxError::new)
    }

    fn clock(&self) -> &Clock {
        &self.inner.clock
    }
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("listen", &self.inner.config.listen)
            .finish_non_exhaustive()
    }
}
