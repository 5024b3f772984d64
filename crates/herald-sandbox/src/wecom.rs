//! WeCom (企业微信) application messages: `GET /cgi-bin/gettoken?corpid=&corpsecret=` (the same
//! token again until it expires) and `POST /cgi-bin/message/send?access_token=`, which answers
//! partial success with `invaliduser` and 81013 when every recipient is invalid. Above 30
//! messages a minute to one member from one app WeCom drops messages *silently* (answering ok),
//! and so does the sandbox: [`Sandbox::wecom_messages`] marks them `dropped`.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::wx_error::{INVALID_CREDENTIAL, WxError};
use crate::{Sandbox, paths};

pub const INVALID_CORPID: i64 = 40013;
pub const INVALID_AGENTID: i64 = 40056;
pub const ALL_RECIPIENTS_INVALID: i64 = 81013;
pub const EMPTY_CONTENT: i64 = 44004;
pub const INVALID_MESSAGE_TYPE: i64 = 40008;

/// A WeCom organisation known to the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxCorp {
    pub corpid: String,
    pub agents: Vec<SandboxAgent>,
    /// Member user ids.
    pub users: Vec<String>,
}

/// One self-built application of a corp.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxAgent {
    pub agentid: u32,
    pub secret: String,
}

impl SandboxCorp {
    pub fn demo() -> Self {
        Self {
            corpid: "wwdemo0000000001".into(),
            agents: vec![SandboxAgent {
                agentid: 1_000_002,
                secret: "demo-wecom-secret".into(),
            }],
            users: vec!["zhangsan".into(), "lisi".into(), "wangwu".into()],
        }
    }
}

/// A message WeCom took for one member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WecomMessage {
    pub corpid: String,
    pub agentid: u32,
    pub userid: String,
    pub msgid: String,
    pub body: Value,
    /// Over 30 a minute for this member from this app: answered ok, never shown.
    pub dropped: bool,
    pub at: DateTime<Utc>,
}

#[derive(Default)]
pub(crate) struct WecomState {
    /// Per (agent key, userid): when messages were taken in the last minute.
    recent: HashMap<(String, String), Vec<DateTime<Utc>>>,
    messages: Vec<WecomMessage>,
    next_msgid: u64,
}

/// Per member per app per minute (documented; the excess is dropped silently).
const PER_MEMBER_PER_MINUTE: usize = 30;

impl Sandbox {
    /// Every message WeCom took, per member, oldest first.
    pub fn wecom_messages(&self) -> Vec<WecomMessage> {
        self.lock().wecom.messages.clone()
    }
}

/// The token store's key for one app of one corp.
fn agent_key(corpid: &str, agentid: u32) -> String {
    format!("wecom:{corpid}/{agentid}")
}

/// `GET /cgi-bin/gettoken?corpid=&corpsecret=`.
pub(crate) async fn gettoken(
    State(sandbox): State<Sandbox>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    if let Some(err) = sandbox.take_injected(paths::WECOM_GETTOKEN) {
        return err.respond(sandbox.clock());
    }
    let now = sandbox.clock().now();
    let ttl =
        TimeDelta::seconds(i64::try_from(sandbox.inner.config.token_ttl_secs).unwrap_or(7200));
    let corpid = query.get("corpid").map(String::as_str).unwrap_or_default();
    let secret = query
        .get("corpsecret")
        .map(String::as_str)
        .unwrap_or_default();
    let mut state = sandbox.lock();
    let state = &mut *state;
    let Some(corp) = state.wecom_corps.get(corpid) else {
        return WxError::new(INVALID_CORPID).respond(sandbox.clock());
    };
    let Some(agent) = corp.agents.iter().find(|a| a.secret == secret) else {
        // WeCom: a wrong corpsecret is 40001.
        return WxError::new(INVALID_CREDENTIAL).respond(sandbox.clock());
    };
    let key = agent_key(corpid, agent.agentid);
    match state
        .tokens
        .stable(&key, now, ttl, TimeDelta::zero(), false)
    {
        Ok(issued) => Json(json!({
            "errcode": 0,
            "errmsg": "ok",
            "access_token": issued.token,
            "expires_in": issued.expires_in,
        }))
        .into_response(),
        Err(err) => err.respond(sandbox.clock()),
    }
}

/// `POST /cgi-bin/message/send?access_token=`.
pub(crate) async fn send(
    State(sandbox): State<Sandbox>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
) -> Response {
    let clock = sandbox.clock();
    let token = match sandbox.admit_call(paths::WECOM_MESSAGE_SEND, query) {
        Ok(token) => token,
        Err(err) => return err.respond(clock),
    };
    let now = clock.now();
    let mut state = sandbox.lock();
    let state = &mut *state;
    let key = match state.tokens.check(&token, now) {
        Ok(key) => key.to_owned(),
        Err(err) => return err.respond(clock),
    };
    let Some((corpid, agentid)) = key
        .strip_prefix("wecom:")
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(corp, agent)| Some((corp.to_owned(), agent.parse::<u32>().ok()?)))
    else {
        // A WeChat Official Account token at WeCom's API.
        return WxError::new(INVALID_CREDENTIAL).respond(clock);
    };
    let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(&body) else {
        return WxError::new(crate::wx_error::DATA_FORMAT_ERROR).respond(clock);
    };
    if message.get("agentid").and_then(Value::as_u64) != Some(u64::from(agentid)) {
        return WxError::new(INVALID_AGENTID).respond(clock);
    }
    let msgtype = message.get("msgtype").and_then(Value::as_str).unwrap_or("");
    let content_ok = match msgtype {
        "text" | "markdown" => message
            .get(msgtype)
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .is_some_and(|c| !c.is_empty()),
        "textcard" => ["title", "description", "url"].iter().all(|k| {
            message
                .get("textcard")
                .and_then(|m| m.get(*k))
                .and_then(Value::as_str)
                .is_some_and(|v| !v.is_empty())
        }),
        _ => return WxError::new(INVALID_MESSAGE_TYPE).respond(clock),
    };
    if !content_ok {
        return WxError::new(EMPTY_CONTENT).respond(clock);
    }
    let members = state
        .wecom_corps
        .get(&corpid)
        .map(|c| c.users.clone())
        .unwrap_or_default();
    let touser = message.get("touser").and_then(Value::as_str).unwrap_or("");
    let (valid, invalid): (Vec<&str>, Vec<&str>) = touser
        .split('|')
        .filter(|u| !u.is_empty())
        .partition(|u| members.iter().any(|m| m == u));
    if valid.is_empty() {
        return Json(json!({
            "errcode": ALL_RECIPIENTS_INVALID,
            "errmsg": "user & party & tag all invalid",
            "invaliduser": invalid.join("|"),
        }))
        .into_response();
    }
    let wecom = &mut state.wecom;
    wecom.next_msgid += 1;
    let msgid = format!("sandbox-wecom-{}-{}", now.timestamp(), wecom.next_msgid);
    for userid in &valid {
        let recent = wecom
            .recent
            .entry((key.clone(), (*userid).to_owned()))
            .or_default();
        recent.retain(|t| now - *t < TimeDelta::minutes(1));
        let dropped = recent.len() >= PER_MEMBER_PER_MINUTE;
        recent.push(now);
        wecom.messages.push(WecomMessage {
            corpid: corpid.clone(),
            agentid,
            userid: (*userid).to_owned(),
            msgid: msgid.clone(),
            body: Value::Object(message.clone()),
            dropped,
            at: now,
        });
    }
    sandbox.inner.requests_changed.send_modify(|n| *n += 1);
    Json(json!({
        "errcode": 0,
        "errmsg": "ok",
        "invaliduser": invalid.join("|"),
        "msgid": msgid,
    }))
    .into_response()
}
