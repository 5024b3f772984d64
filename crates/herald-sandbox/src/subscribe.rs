//! Subscribe messages: the Official Account's `POST /cgi-bin/message/subscribe/bizsend` and the
//! mini program's `POST /cgi-bin/message/subscribe/send`, with WeChat's field-type limits,
//! one-time consent (a send uses up one acceptance; without one the answer is 43101) and the
//! `subscribe_msg_sent_event` callback.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::callbacks::{self, CallbackEvent, CallbackJob};
use crate::wx_error::{
    ARGUMENT_INVALID, DATA_FORMAT_ERROR, INVALID_OPENID, INVALID_TEMPLATE_ID, SUBSCRIPTION_REFUSED,
    WxError,
};
use crate::{Sandbox, SandboxApp, paths};

/// Acceptances per (appid, openid, template_id): each send uses one.
#[derive(Default)]
pub(crate) struct Consents(HashMap<(String, String, String), u32>);

impl Sandbox {
    /// The user `openid` accepts `times` more subscribe messages of `template_id` from `appid`
    /// (what tapping "allow" in WeChat's subscription dialog does).
    pub fn grant_subscription(&self, appid: &str, openid: &str, template_id: &str, times: u32) {
        let mut state = self.lock();
        *state
            .consents
            .0
            .entry((appid.into(), openid.into(), template_id.into()))
            .or_default() += times;
    }

    /// Acceptances `openid` has left for `template_id` of `appid`.
    pub fn subscriptions_left(&self, appid: &str, openid: &str, template_id: &str) -> u32 {
        let state = self.lock();
        state
            .consents
            .0
            .get(&(appid.into(), openid.into(), template_id.into()))
            .copied()
            .unwrap_or(0)
    }
}

pub(crate) async fn bizsend(
    State(sandbox): State<Sandbox>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
) -> Response {
    send(sandbox, paths::SUBSCRIBE_BIZSEND, query, body).await
}

pub(crate) async fn miniprogram_send(
    State(sandbox): State<Sandbox>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
) -> Response {
    send(sandbox, paths::SUBSCRIBE_SEND, query, body).await
}

async fn send(
    sandbox: Sandbox,
    path: &str,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
) -> Response {
    let clock = sandbox.clock();
    let token = match sandbox.admit_call(path, query) {
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
                let (touser, template_id) = validate(&body, app)?;
                // One acceptance per message: none left is WeChat's 43101.
                let key = (appid.clone(), touser.clone(), template_id.clone());
                match state.consents.0.get_mut(&key) {
                    Some(left) if *left > 0 => *left -= 1,
                    _ => return Err(WxError::new(SUBSCRIPTION_REFUSED)),
                }
                let (msgid, _) = state.sends.accept(&appid, &touser, None, now);
                Ok((appid, touser, template_id, msgid))
            })
    };
    match outcome {
        Ok((appid, openid, template_id, msgid)) => {
            tracing::info!(appid, msgid, path, "subscribe message accepted");
            sandbox.inner.requests_changed.send_modify(|n| *n += 1);
            callbacks::schedule(
                sandbox.clone(),
                CallbackJob {
                    appid,
                    openid,
                    msgid,
                    status: "success".into(),
                    event: CallbackEvent::SubscribeMsgSent { template_id },
                },
            );
            Json(json!({ "errcode": 0, "errmsg": "ok", "msgid": msgid })).into_response()
        }
        Err(err) => {
            tracing::info!(%err, path, "subscribe message refused");
            err.respond(clock)
        }
    }
}

/// Checks the body in WeChat's order: JSON, touser, template_id, the optional fields' shapes,
/// then every data value against its field type. Answers the recipient and template.
fn validate(body: &[u8], app: &SandboxApp) -> Result<(String, String), WxError> {
    let format_error = || WxError::new(DATA_FORMAT_ERROR);
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(body) else {
        return Err(format_error());
    };
    let touser = body
        .get("touser")
        .and_then(Value::as_str)
        .filter(|openid| crate::template::is_openid(openid))
        .ok_or_else(|| WxError::new(INVALID_OPENID))?;
    let template = body
        .get("template_id")
        .and_then(Value::as_str)
        .and_then(|id| app.subscribe_templates.iter().find(|t| t.template_id == id))
        .ok_or_else(|| WxError::new(INVALID_TEMPLATE_ID))?;
    for optional in ["page"] {
        if !matches!(body.get(optional), None | Some(Value::String(_))) {
            return Err(format_error());
        }
    }
    let invalid = |what: &str| {
        WxError::with_detail(
            ARGUMENT_INVALID,
            format!("argument invalid! {what} invalid"),
        )
    };
    if let Some(state) = body.get("miniprogram_state")
        && !matches!(state.as_str(), Some("developer" | "trial" | "formal"))
    {
        return Err(invalid("miniprogram_state"));
    }
    if let Some(lang) = body.get("lang")
        && !matches!(lang.as_str(), Some("zh_CN" | "en_US" | "zh_HK" | "zh_TW"))
    {
        return Err(invalid("lang"));
    }
    if !matches!(body.get("miniprogram"), None | Some(Value::Object(_))) {
        return Err(format_error());
    }
    let Some(Value::Object(data)) = body.get("data") else {
        return Err(invalid("data"));
    };
    check_data(data, &template.keys).map_err(|key| invalid(&format!("data.{key}.value")))?;
    Ok((touser.to_owned(), template.template_id.clone()))
}

/// Every declared key is present with a string `value` (no `color`: subscribe messages have
/// none) that fits its field type; keys the template does not declare are refused.
fn check_data(data: &Map<String, Value>, declared: &[String]) -> Result<(), String> {
    for key in data.keys() {
        if !declared.contains(key) {
            return Err(key.clone());
        }
    }
    for key in declared {
        let value = data
            .get(key)
            .and_then(|entry| entry.get("value"))
            .and_then(Value::as_str)
            .ok_or_else(|| key.clone())?;
        if !fits(key, value) {
            return Err(key.clone());
        }
    }
    Ok(())
}

/// WeChat's limits by field type (the key without its number: `thing1` is a `thing`).
fn fits(key: &str, value: &str) -> bool {
    let kind = key.trim_end_matches(|c: char| c.is_ascii_digit());
    let chars = value.chars().count();
    let cjk = |c: char| ('\u{4e00}'..='\u{9fff}').contains(&c);
    match kind {
        "thing" => (1..=20).contains(&chars),
        "number" => {
            (1..=32).contains(&chars) && value.chars().all(|c| c.is_ascii_digit() || c == '.')
        }
        "letter" => (1..=32).contains(&chars) && value.chars().all(|c| c.is_ascii_alphabetic()),
        "symbol" => (1..=5).contains(&chars),
        "character_string" => {
            (1..=32).contains(&chars) && value.chars().all(|c| c.is_ascii_graphic())
        }
        "phone_number" => {
            (1..=17).contains(&chars)
                && value
                    .chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '+' | '-' | ' '))
        }
        "car_number" => (1..=8).contains(&chars),
        "name" => {
            if value.chars().any(cjk) {
                (1..=10).contains(&chars)
            } else {
                (1..=20).contains(&chars)
            }
        }
        "phrase" => (1..=5).contains(&chars) && value.chars().all(cjk),
        "amount" => {
            let digits = value
                .trim_start_matches(['¥', '$', '€', '£', '￥'])
                .trim_end_matches('元');
            let count = digits.chars().filter(char::is_ascii_digit).count();
            (1..=10).contains(&count) && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        }
        "time" | "date" => {
            (1..=30).contains(&chars)
                && value.chars().any(|c| c.is_ascii_digit())
                && value.chars().all(|c| {
                    c.is_ascii_digit()
                        || matches!(c, '-' | ':' | ' ' | '/' | '~' | '年' | '月' | '日')
                })
        }
        _ => chars > 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_types_follow_wechats_limits() {
        assert!(fits("thing1", "二十个字以内的事情"));
        assert!(!fits("thing1", &"字".repeat(21)));
        assert!(fits("number2", "12345.6"));
        assert!(!fits("number2", "12a"));
        assert!(fits("character_string3", "SO-2026-0001"));
        assert!(!fits("character_string3", &"x".repeat(33)));
        assert!(fits("phrase4", "已发货"));
        assert!(!fits("phrase4", "shipped"));
        assert!(fits("amount5", "¥100.50"));
        assert!(!fits("amount5", "¥12345678901"));
        assert!(fits("time6", "2026-11-23 15:01"));
        assert!(fits("date7", "2026年11月23日"));
        assert!(!fits("time6", "tomorrow"));
        assert!(fits("name8", "张三"));
        assert!(!fits("name8", &"张".repeat(11)));
        assert!(fits("phone_number9", "+86 138-0000-0000"));
        assert!(!fits("thing1", ""));
    }

    #[test]
    fn validation_order_and_shapes() {
        let app = SandboxApp::demo();
        let openid = "oABCDEFGHIJKLMNOPQRSTUVWXYZ0";
        let code = |body: Value| {
            validate(&serde_json::to_vec(&body).unwrap_or_default(), &app)
                .map(|_| 0)
                .unwrap_or_else(|e| e.code)
        };
        let data = json!({"character_string1": {"value": "SO-1"}, "thing2": {"value": "顺丰"},
            "thing3": {"value": "Arrives tomorrow"}});
        assert_eq!(code(json!({"template_id": "x"})), INVALID_OPENID);
        assert_eq!(
            code(json!({"touser": openid, "template_id": "x"})),
            INVALID_TEMPLATE_ID
        );
        let ok = json!({"touser": openid, "template_id": "sub_order_shipped",
            "page": "pages/order?id=1", "miniprogram_state": "formal", "lang": "zh_CN", "data": data});
        assert_eq!(code(ok.clone()), 0);
        let mut bad = ok.clone();
        bad["miniprogram_state"] = json!("production");
        assert_eq!(code(bad), ARGUMENT_INVALID);
        let mut long = ok.clone();
        long["data"]["thing2"]["value"] = json!("x".repeat(21));
        assert_eq!(code(long), ARGUMENT_INVALID);
        let mut missing = ok;
        missing["data"]
            .as_object_mut()
            .map(|data| data.remove("thing3"));
        assert_eq!(code(missing), ARGUMENT_INVALID);
    }
}
