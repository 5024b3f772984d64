//! Group robots: WeCom's `POST /cgi-bin/webhook/send?key=`, DingTalk's
//! `POST /robot/send?access_token=&timestamp=&sign=` and Feishu's
//! `POST /open-apis/bot/v2/hook/{token}`, each with its own signature scheme (WeCom has none;
//! DingTalk's and Feishu's differ: ../shared/WECHAT.md), keyword check, message shapes and
//! rate limits (WeCom: 20 a minute, then 45009; DingTalk: 20 a minute, then 130101 and a
//! 10-minute block; Feishu: 5 a second and 100 a minute, then HTTP 400 with code 9499).

use std::collections::{HashMap, VecDeque};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, TimeDelta, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::Sandbox;

/// One robot known to the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRobot {
    pub kind: RobotKind,
    /// DingTalk's `access_token`, or the last part of Feishu's hook URL.
    pub token: String,
    /// When set, requests must be signed with it.
    #[serde(default)]
    pub secret: Option<String>,
    /// When set, a message must contain one of them ("custom keywords" security).
    #[serde(default)]
    pub keywords: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RobotKind {
    Wecom,
    Dingtalk,
    Feishu,
}

impl SandboxRobot {
    /// The demo robots the dev stack is wired to.
    pub fn demo() -> Vec<Self> {
        vec![
            Self {
                kind: RobotKind::Wecom,
                token: "demo-wecom-robot-key".into(),
                secret: None,
                keywords: vec![],
            },
            Self {
                kind: RobotKind::Dingtalk,
                token: "demo-dingtalk-robot".into(),
                secret: Some("SECdemo0000000000000000000000000000000000000000000000000".into()),
                keywords: vec![],
            },
            Self {
                kind: RobotKind::Feishu,
                token: "demo-feishu-robot".into(),
                secret: Some("demo-feishu-secret".into()),
                keywords: vec![],
            },
        ]
    }
}

/// A message a robot posted to its group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RobotMessage {
    pub kind: RobotKind,
    pub token: String,
    /// The body as received (Feishu's `timestamp`/`sign` included).
    pub body: Value,
    pub at: DateTime<Utc>,
}

#[derive(Default)]
pub(crate) struct RobotState {
    /// Accepted messages' times per robot token (the last minute is what counts).
    recent: HashMap<String, VecDeque<DateTime<Utc>>>,
    /// DingTalk robots blocked until then after going over their limit.
    blocked_until: HashMap<String, DateTime<Utc>>,
    messages: Vec<RobotMessage>,
}

/// Oldest messages are dropped past this.
const MAX_MESSAGES: usize = 100_000;

impl Sandbox {
    /// Adds (or replaces) a robot.
    pub fn add_robot(&self, robot: SandboxRobot) {
        let mut state = self.lock();
        state.robot_configs.insert(robot.token.clone(), robot);
    }

    /// Every message robots posted, oldest first.
    pub fn robot_messages(&self) -> Vec<RobotMessage> {
        self.lock().robots.messages.clone()
    }
}

type HmacSha256 = Hmac<Sha256>;

fn dingtalk_sign(timestamp_ms: &str, secret: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{timestamp_ms}\n{secret}").as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

fn feishu_sign(timestamp_s: &str, secret: &str) -> String {
    let mac = HmacSha256::new_from_slice(format!("{timestamp_s}\n{secret}").as_bytes())
        .expect("HMAC takes any key");
    BASE64.encode(mac.finalize().into_bytes())
}

fn dingtalk_error(code: i64, message: &str) -> Response {
    Json(json!({"errcode": code, "errmsg": message})).into_response()
}

fn feishu_error(status: StatusCode, code: i64, message: &str) -> Response {
    (
        status,
        Json(json!({"code": code, "msg": message, "data": {}})),
    )
        .into_response()
}

/// The text a keyword check looks at: every string in the message.
fn texts(value: &Value, out: &mut String) {
    match value {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(items) => items.iter().for_each(|v| texts(v, out)),
        Value::Object(map) => map.values().for_each(|v| texts(v, out)),
        _ => {}
    }
}

/// Counts the message against the robot's window; `Err` when over.
fn admit(
    state: &mut RobotState,
    token: &str,
    now: DateTime<Utc>,
    limits: &[(TimeDelta, usize)],
) -> Result<(), ()> {
    let recent = state.recent.entry(token.to_owned()).or_default();
    let longest = limits.iter().map(|(w, _)| *w).max().unwrap_or_default();
    while recent.front().is_some_and(|t| now - *t >= longest) {
        recent.pop_front();
    }
    for (window, max) in limits {
        if recent.iter().filter(|t| now - **t < *window).count() >= *max {
            return Err(());
        }
    }
    recent.push_back(now);
    Ok(())
}

fn record(state: &mut RobotState, kind: RobotKind, token: &str, body: Value, at: DateTime<Utc>) {
    if state.messages.len() >= MAX_MESSAGES {
        state.messages.remove(0);
    }
    state.messages.push(RobotMessage {
        kind,
        token: token.to_owned(),
        body,
        at,
    });
}

#[derive(Deserialize)]
pub(crate) struct DingtalkQuery {
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    sign: Option<String>,
}

/// `POST /robot/send`.
pub(crate) async fn dingtalk(
    State(sandbox): State<Sandbox>,
    Query(query): Query<DingtalkQuery>,
    body: Bytes,
) -> Response {
    if let Some(err) = sandbox.take_injected(crate::paths::DINGTALK_ROBOT) {
        return dingtalk_error(err.code, &err.to_string());
    }
    let now = sandbox.clock().now();
    let mut state = sandbox.lock();
    let state = &mut *state;
    let Some(robot) = state
        .robot_configs
        .get(&query.access_token)
        .filter(|r| r.kind == RobotKind::Dingtalk)
        .cloned()
    else {
        return dingtalk_error(300001, "token is not exist");
    };
    if let Some(secret) = &robot.secret {
        let (Some(timestamp), Some(sign)) = (&query.timestamp, &query.sign) else {
            return dingtalk_error(310000, "sign not match");
        };
        let fresh = timestamp
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis)
            .is_some_and(|t| (now - t).abs() < TimeDelta::hours(1));
        if !fresh {
            return dingtalk_error(310000, "invalid timestamp");
        }
        if *sign != dingtalk_sign(timestamp, secret) {
            return dingtalk_error(310000, "sign not match");
        }
    }
    let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(&body) else {
        return dingtalk_error(40035, "缺少参数 json");
    };
    let msgtype = message.get("msgtype").and_then(Value::as_str).unwrap_or("");
    let valid = match msgtype {
        "text" => message
            .get("text")
            .and_then(|t| t.get("content"))
            .is_some_and(Value::is_string),
        "markdown" => ["title", "text"].iter().all(|k| {
            message
                .get("markdown")
                .and_then(|m| m.get(*k))
                .is_some_and(Value::is_string)
        }),
        "actionCard" => ["title", "text"].iter().all(|k| {
            message
                .get("actionCard")
                .and_then(|m| m.get(*k))
                .is_some_and(Value::is_string)
        }),
        "link" => message.get("link").is_some_and(Value::is_object),
        "feedCard" => message.get("feedCard").is_some_and(Value::is_object),
        _ => false,
    };
    if !valid {
        return dingtalk_error(40035, "缺少参数 msgtype/content");
    }
    if !robot.keywords.is_empty() {
        let mut text = String::new();
        texts(&Value::Object(message.clone()), &mut text);
        if !robot.keywords.iter().any(|k| text.contains(k.as_str())) {
            return dingtalk_error(310000, "keywords not in content");
        }
    }
    if state
        .robots
        .blocked_until
        .get(&robot.token)
        .is_some_and(|until| now < *until)
    {
        return dingtalk_error(130101, "send too fast, exceed 20 times per minute");
    }
    if admit(
        &mut state.robots,
        &robot.token,
        now,
        &[(TimeDelta::minutes(1), 20)],
    )
    .is_err()
    {
        state
            .robots
            .blocked_until
            .insert(robot.token.clone(), now + TimeDelta::minutes(10));
        return dingtalk_error(130101, "send too fast, exceed 20 times per minute");
    }
    record(
        &mut state.robots,
        RobotKind::Dingtalk,
        &robot.token,
        Value::Object(message),
        now,
    );
    sandbox.inner.requests_changed.send_modify(|n| *n += 1);
    Json(json!({"errcode": 0, "errmsg": "ok"})).into_response()
}

#[derive(Deserialize)]
pub(crate) struct WecomQuery {
    #[serde(default)]
    key: String,
}

/// `POST /cgi-bin/webhook/send?key=`.
pub(crate) async fn wecom(
    State(sandbox): State<Sandbox>,
    Query(query): Query<WecomQuery>,
    body: Bytes,
) -> Response {
    if let Some(err) = sandbox.take_injected(crate::paths::WECOM_ROBOT) {
        return dingtalk_error(err.code, &err.to_string());
    }
    let now = sandbox.clock().now();
    let mut state = sandbox.lock();
    let state = &mut *state;
    let Some(robot) = state
        .robot_configs
        .get(&query.key)
        .filter(|r| r.kind == RobotKind::Wecom)
        .cloned()
    else {
        return dingtalk_error(93000, "invalid webhook url");
    };
    let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(&body) else {
        return dingtalk_error(40008, "invalid message type");
    };
    let content = |kind: &str| {
        message
            .get(kind)
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str)
            .map(str::len)
    };
    let msgtype = message.get("msgtype").and_then(Value::as_str).unwrap_or("");
    let too_long = match (msgtype, content("text"), content("markdown")) {
        ("text", Some(len), _) => len > 2048,
        ("markdown", _, Some(len)) => len > 4096,
        ("text" | "markdown", _, _) => return dingtalk_error(44004, "empty content"),
        ("image" | "news" | "file" | "template_card", _, _) => false,
        _ => return dingtalk_error(40008, "invalid message type"),
    };
    if too_long {
        return dingtalk_error(40058, "content exceed max length");
    }
    if admit(
        &mut state.robots,
        &robot.token,
        now,
        &[(TimeDelta::minutes(1), 20)],
    )
    .is_err()
    {
        return dingtalk_error(45009, "api freq out of limit");
    }
    record(
        &mut state.robots,
        RobotKind::Wecom,
        &robot.token,
        Value::Object(message),
        now,
    );
    sandbox.inner.requests_changed.send_modify(|n| *n += 1);
    Json(json!({"errcode": 0, "errmsg": "ok"})).into_response()
}

/// `POST /open-apis/bot/v2/hook/{token}`.
pub(crate) async fn feishu(
    State(sandbox): State<Sandbox>,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(err) = sandbox.take_injected(crate::paths::FEISHU_ROBOT) {
        return feishu_error(StatusCode::OK, err.code, &err.to_string());
    }
    let now = sandbox.clock().now();
    let mut state = sandbox.lock();
    let state = &mut *state;
    let Some(robot) = state
        .robot_configs
        .get(&token)
        .filter(|r| r.kind == RobotKind::Feishu)
        .cloned()
    else {
        return feishu_error(
            StatusCode::NOT_FOUND,
            19001,
            "param invalid: incoming webhook access token invalid",
        );
    };
    let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(&body) else {
        return feishu_error(StatusCode::BAD_REQUEST, 9499, "Bad Request");
    };
    if let Some(secret) = &robot.secret {
        let timestamp = message.get("timestamp").and_then(Value::as_str);
        let sign = message.get("sign").and_then(Value::as_str);
        let valid = match (timestamp, sign) {
            (Some(timestamp), Some(sign)) => {
                let fresh = timestamp
                    .parse::<i64>()
                    .ok()
                    .and_then(|t| DateTime::from_timestamp(t, 0))
                    .is_some_and(|t| (now - t).abs() < TimeDelta::hours(1));
                fresh && sign == feishu_sign(timestamp, secret)
            }
            _ => false,
        };
        if !valid {
            return feishu_error(
                StatusCode::OK,
                19021,
                "sign match fail or timestamp is not within one hour from current time",
            );
        }
    }
    let msg_type = message
        .get("msg_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let valid = match msg_type {
        "text" => message
            .get("content")
            .and_then(|c| c.get("text"))
            .is_some_and(Value::is_string),
        "post" => message
            .get("content")
            .and_then(|c| c.get("post"))
            .is_some_and(Value::is_object),
        "interactive" => message.get("card").is_some_and(Value::is_object),
        "image" | "share_chat" => message.get("content").is_some_and(Value::is_object),
        _ => false,
    };
    if !valid || body.len() > 20 * 1024 {
        return feishu_error(StatusCode::OK, 19002, "params error");
    }
    if !robot.keywords.is_empty() {
        let mut text = String::new();
        texts(&Value::Object(message.clone()), &mut text);
        if !robot.keywords.iter().any(|k| text.contains(k.as_str())) {
            return feishu_error(StatusCode::OK, 19024, "Key Words Not Found");
        }
    }
    let limits = [(TimeDelta::seconds(1), 5), (TimeDelta::minutes(1), 100)];
    if admit(&mut state.robots, &robot.token, now, &limits).is_err() {
        return feishu_error(StatusCode::BAD_REQUEST, 9499, "too many request");
    }
    record(
        &mut state.robots,
        RobotKind::Feishu,
        &robot.token,
        Value::Object(message),
        now,
    );
    sandbox.inner.requests_changed.send_modify(|n| *n += 1);
    Json(json!({"code": 0, "msg": "success", "data": {}})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_the_last_second_and_minute() {
        let mut state = RobotState::default();
        let t0 = Utc::now();
        let limits = [(TimeDelta::seconds(1), 5), (TimeDelta::minutes(1), 100)];
        for _ in 0..5 {
            assert!(admit(&mut state, "r", t0, &limits).is_ok());
        }
        assert!(
            admit(&mut state, "r", t0, &limits).is_err(),
            "6th in a second"
        );
        let t1 = t0 + TimeDelta::seconds(1);
        assert!(admit(&mut state, "r", t1, &limits).is_ok());
        assert!(admit(&mut state, "other", t0, &limits).is_ok());
    }

    #[test]
    fn signatures_follow_each_scheme() {
        // ../shared/vectors/crypto.json, first entries.
        assert_eq!(
            dingtalk_sign("1577262236757", "this is secret"),
            "hmPWwU+7lVdm3ZZz0r9tSfx0L4Q26jWOZr9+Gs6EZQM="
        );
        assert_eq!(
            feishu_sign("1599360473", "test-secret"),
            "wSds2BzzFIIGf/WrhUO+NI1q/9j+FRJd3JNHKAq0NZY="
        );
    }
}
