//! `POST /cgi-bin/message/template/send`: validation in WeChat's order, msgids, client_msg_id
//! deduplication, and scheduling the TEMPLATESENDJOBFINISH callback.

use std::collections::{HashMap, VecDeque};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::callbacks::{self, CallbackEvent, CallbackJob};
use crate::wx_error::{
    ARGUMENT_INVALID, DATA_FORMAT_ERROR, INVALID_OPENID, INVALID_TEMPLATE_ID, WxError,
};
use crate::{Sandbox, SandboxApp, paths};

/// Above 2^53 on purpose: a client that parses msgid as f64 (JavaScript-style) loses digits.
const MSGID_BASE: u64 = 3_000_000_000_000_000_000;

/// The first msgid of this sandbox: time-based, so a restarted sandbox never hands out a msgid
/// an earlier run used (WeChat's msgids are unique too; Herald's database relies on it).
fn first_msgid() -> u64 {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(0))
        .unwrap_or(0);
    // Microseconds since 1970 stay below 10^17 until the year 5138, far under the base.
    MSGID_BASE + micros * 10
}
/// WeChat sends one message per openid + client_msg_id within this window.
const DEDUP_WINDOW: TimeDelta = TimeDelta::minutes(10);
/// Keys WeChat ignores nowadays: accepted even when the template does not declare them.
const LEGACY_KEYS: [&str; 2] = ["first", "remark"];

pub(crate) struct SendStore {
    next_msgid: u64,
    /// (appid, openid, client_msg_id) → (msgid, first sent at).
    sent: HashMap<(String, String, String), (u64, DateTime<Utc>)>,
    /// Every message that went out (duplicates answered from `sent` are not here), oldest first.
    accepted: VecDeque<AcceptedSend>,
}

impl Default for SendStore {
    fn default() -> Self {
        Self {
            next_msgid: first_msgid(),
            sent: HashMap::new(),
            accepted: VecDeque::new(),
        }
    }
}

/// A template message the sandbox delivered: one per message that reached the user, however
/// often the sender called (a repeated client_msg_id is answered without a second delivery).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedSend {
    pub appid: String,
    pub openid: String,
    pub client_msg_id: Option<String>,
    pub msgid: u64,
    pub at: DateTime<Utc>,
}

/// Oldest accepted sends are dropped past this, so a long-running dev sandbox stays bounded.
const MAX_ACCEPTED: usize = 100_000;

impl Sandbox {
    /// The template messages that went out to users (not the calls: a call answered as a
    /// duplicate of an earlier client_msg_id is not a delivery), oldest first.
    pub fn accepted_sends(&self) -> Vec<AcceptedSend> {
        self.lock().sends.accepted.iter().cloned().collect()
    }

    /// Resolves as soon as at least `n` messages went out; at `timeout`, returns what there is.
    pub async fn wait_for_accepted_sends(
        &self,
        n: usize,
        timeout: std::time::Duration,
    ) -> Vec<AcceptedSend> {
        let mut changed = self.inner.requests_changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = self.accepted_sends();
            if found.len() >= n {
                return found;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.accepted_sends(),
            }
        }
    }
}

impl SendStore {
    /// The msgid for this send, and whether it is a duplicate of an earlier one.
    pub(crate) fn accept(
        &mut self,
        appid: &str,
        openid: &str,
        client_msg_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> (u64, bool) {
        self.sent.retain(|_, (_, at)| now - *at < DEDUP_WINDOW);
        let key = client_msg_id.map(|id| (appid.to_owned(), openid.to_owned(), id.to_owned()));
        if let Some((msgid, _)) = key.as_ref().and_then(|key| self.sent.get(key)) {
            return (*msgid, true);
        }
        let msgid = self.next_msgid;
        self.next_msgid += 1;
        if self.accepted.len() >= MAX_ACCEPTED {
            self.accepted.pop_front();
        }
        self.accepted.push_back(AcceptedSend {
            appid: appid.to_owned(),
            openid: openid.to_owned(),
            client_msg_id: client_msg_id.map(str::to_owned),
            msgid,
            at: now,
        });
        if let Some(key) = key {
            self.sent.insert(key, (msgid, now));
        }
        (msgid, false)
    }
}

/// What the sandbox needs from a valid send body.
#[derive(Debug)]
struct SendRequest {
    touser: String,
    client_msg_id: Option<String>,
}

pub(crate) async fn send(
    State(sandbox): State<Sandbox>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
) -> Response {
    let clock = sandbox.clock();
    let token = match sandbox.admit_call(paths::TEMPLATE_SEND, query) {
        Ok(token) => token,
        Err(err) => return err.respond(clock),
    };
    let now = clock.now();
    let outcome = {
        let mut state = sandbox.lock();
        let state = &mut *state;
        state
            .tokens
            .check(&token, now)
            .map(str::to_owned)
            .and_then(|appid| {
                let app = state
                    .apps
                    .get(&appid)
                    .ok_or_else(|| WxError::new(crate::wx_error::INVALID_CREDENTIAL))?;
                let request = validate(&body, app)?;
                let (msgid, duplicate) = state.sends.accept(
                    &appid,
                    &request.touser,
                    request.client_msg_id.as_deref(),
                    now,
                );
                let status = state
                    .callback_status
                    .get(&request.touser)
                    .cloned()
                    .unwrap_or_else(|| "success".to_owned());
                Ok((appid, request, msgid, duplicate, status))
            })
    };
    match outcome {
        Ok((appid, request, msgid, duplicate, status)) => {
            tracing::info!(
                appid,
                // Recipient addresses never go to logs whole.
                openid = %mask(&request.touser),
                msgid,
                duplicate,
                "template message accepted"
            );
            if !duplicate {
                // Wakes `wait_for_accepted_sends` (and request waiters, who look again).
                sandbox.inner.requests_changed.send_modify(|n| *n += 1);
            }
            // The duplicate answer is the original msgid with no second delivery. WeChat's exact
            // answer to a duplicate client_msg_id is unconfirmed; this is what Herald relies on
            // (the retried send is idempotent and reports the message it already sent).
            if !duplicate {
                callbacks::schedule(
                    sandbox.clone(),
                    CallbackJob {
                        appid,
                        openid: request.touser,
                        msgid,
                        status,
                        event: CallbackEvent::TemplateSendJobFinish,
                    },
                );
            }
            Json(json!({ "errcode": 0, "errmsg": "ok", "msgid": msgid })).into_response()
        }
        Err(err) => {
            tracing::info!(%err, "template message refused");
            err.respond(clock)
        }
    }
}

/// Checks the body against the app, in WeChat's order: JSON, touser, template_id, data.
fn validate(body: &[u8], app: &SandboxApp) -> Result<SendRequest, WxError> {
    let format_error = || WxError::new(DATA_FORMAT_ERROR);
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return Err(format_error());
    };
    let touser = body
        .get("touser")
        .and_then(Value::as_str)
        .filter(|openid| is_openid(openid))
        .ok_or_else(|| WxError::new(INVALID_OPENID))?;
    let template = body
        .get("template_id")
        .and_then(Value::as_str)
        .and_then(|id| app.templates.iter().find(|t| t.template_id == id))
        .ok_or_else(|| WxError::new(INVALID_TEMPLATE_ID))?;
    match body.get("data") {
        None | Some(Value::Null) => {}
        Some(Value::Object(data)) => check_data(data, &template.keys)?,
        Some(_) => return Err(format_error()),
    }
    for optional in ["url", "client_msg_id"] {
        if !matches!(
            body.get(optional),
            None | Some(Value::Null | Value::String(_))
        ) {
            return Err(format_error());
        }
    }
    if !matches!(
        body.get("miniprogram"),
        None | Some(Value::Null | Value::Object(_))
    ) {
        return Err(format_error());
    }
    Ok(SendRequest {
        touser: touser.to_owned(),
        client_msg_id: body
            .get("client_msg_id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned),
    })
}

/// Every data key must be declared by the template and carry a string `value`.
fn check_data(data: &Map<String, Value>, declared: &[String]) -> Result<(), WxError> {
    for (key, entry) in data {
        let is_declared = declared.iter().any(|k| k == key);
        if !is_declared && LEGACY_KEYS.contains(&key.as_str()) {
            continue;
        }
        let has_value = entry.get("value").is_some_and(Value::is_string);
        if !is_declared || !has_value {
            return Err(WxError::with_detail(
                ARGUMENT_INVALID,
                format!("argument invalid! data.{key}.value invalid"),
            ));
        }
    }
    Ok(())
}

/// Real openids are 28 chars of [A-Za-z0-9_-]; accept 20..=40 to leave room for test fixtures.
pub(crate) fn is_openid(openid: &str) -> bool {
    (20..=40).contains(&openid.len())
        && openid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The first four characters of an address, for logs.
fn mask(address: &str) -> String {
    let head: String = address.chars().take(4).collect();
    format!("{head}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: Value) -> i64 {
        let app = SandboxApp::demo();
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        validate(&bytes, &app).map(|_| 0).unwrap_or_else(|e| e.code)
    }

    #[test]
    fn validation_order() {
        let openid = "oABCDEFGHIJKLMNOPQRSTUVWXYZ0";
        assert_eq!(code(json!([1])), DATA_FORMAT_ERROR);
        assert_eq!(code(json!({"template_id": "nope"})), INVALID_OPENID);
        assert_eq!(
            code(json!({"touser": "o!bad", "template_id": "nope"})),
            INVALID_OPENID
        );
        assert_eq!(
            code(json!({"touser": openid, "template_id": "nope"})),
            INVALID_TEMPLATE_ID
        );
        let ok = json!({"touser": openid, "template_id": "tmpl_order_shipped",
            "data": {"order_id": {"value": "1"}, "first": {"value": "legacy"}}});
        assert_eq!(code(ok), 0);
        let missing_value = json!({"touser": openid, "template_id": "tmpl_order_shipped",
            "data": {"order_id": {"color": "#000"}}});
        assert_eq!(code(missing_value), ARGUMENT_INVALID);
        let bad_url = json!({"touser": openid, "template_id": "tmpl_order_shipped", "url": 5});
        assert_eq!(code(bad_url), DATA_FORMAT_ERROR);
    }

    #[test]
    fn dedup_window() {
        let mut store = SendStore::default();
        let t0 = Utc::now();
        let (a, dup) = store.accept("wx", "o1", Some("k"), t0);
        assert!(!dup);
        assert_eq!(
            store.accept("wx", "o1", Some("k"), t0 + TimeDelta::minutes(9)),
            (a, true)
        );
        assert!(!store.accept("wx", "o2", Some("k"), t0).1);
        assert!(!store.accept("wx", "o1", None, t0).1);
        let (b, dup) = store.accept("wx", "o1", Some("k"), t0 + TimeDelta::minutes(10));
        assert!(!dup);
        assert_ne!(a, b);
    }
}
