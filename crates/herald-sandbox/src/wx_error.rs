//! WeChat's error answers: HTTP 200 with `{"errcode":N,"errmsg":"… rid: …"}`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::clock::Clock;

pub const SYSTEM_ERROR: i64 = -1;
pub const INVALID_CREDENTIAL: i64 = 40001;
pub const INVALID_GRANT_TYPE: i64 = 40002;
pub const INVALID_OPENID: i64 = 40003;
pub const INVALID_APPID: i64 = 40013;
pub const INVALID_TEMPLATE_ID: i64 = 40037;
pub const INVALID_APPSECRET: i64 = 40125;
pub const ACCESS_TOKEN_MISSING: i64 = 41001;
pub const APPID_MISSING: i64 = 41002;
pub const APPSECRET_MISSING: i64 = 41004;
pub const ACCESS_TOKEN_EXPIRED: i64 = 42001;
pub const SUBSCRIPTION_REFUSED: i64 = 43101;
pub const DAILY_QUOTA: i64 = 45009;
pub const MINUTE_QUOTA: i64 = 45011;
pub const DATA_FORMAT_ERROR: i64 = 47001;
pub const ARGUMENT_INVALID: i64 = 47003;

/// WeChat's errmsg text for a code (without the ` rid: …` suffix).
pub fn errmsg(code: i64) -> &'static str {
    match code {
        0 => "ok",
        SYSTEM_ERROR => "system error",
        INVALID_CREDENTIAL => "invalid credential, access_token is invalid or not latest",
        INVALID_GRANT_TYPE => "invalid grant_type",
        INVALID_OPENID => "invalid openid",
        INVALID_APPID => "invalid appid",
        40014 => "invalid access_token",
        40036 => "invalid template_id size",
        INVALID_TEMPLATE_ID => "invalid template_id",
        INVALID_APPSECRET => "invalid appsecret",
        ACCESS_TOKEN_MISSING => "access_token missing",
        APPID_MISSING => "appid missing",
        APPSECRET_MISSING => "appsecret missing",
        ACCESS_TOKEN_EXPIRED => "access_token expired",
        43004 => "require subscribe",
        SUBSCRIPTION_REFUSED => "user refuse to accept the msg",
        DAILY_QUOTA => "reach max api daily quota limit",
        MINUTE_QUOTA => "api minute-quota reach limit mustslower retry next minute",
        DATA_FORMAT_ERROR => "data format error",
        ARGUMENT_INVALID => "argument invalid!",
        48001 => "api unauthorized",
        89503 => "this IP is at risk, please confirm with the administrator",
        _ => "unknown error",
    }
}

/// An error answer. `detail` replaces the standard text when WeChat names the culprit
/// (47003 "argument invalid! data.eta.value invalid").
#[derive(Debug, Clone, thiserror::Error)]
#[error("errcode {code}: {}", self.text())]
pub struct WxError {
    pub code: i64,
    pub detail: Option<String>,
}

impl WxError {
    pub fn new(code: i64) -> Self {
        Self { code, detail: None }
    }

    pub fn with_detail(code: i64, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: Some(detail.into()),
        }
    }

    fn text(&self) -> &str {
        self.detail.as_deref().unwrap_or_else(|| errmsg(self.code))
    }

    /// The JSON body, errmsg suffixed with a request id as WeChat does.
    pub fn body(&self, clock: &Clock) -> serde_json::Value {
        json!({
            "errcode": self.code,
            "errmsg": format!("{} rid: {}", self.text(), rid(clock)),
        })
    }

    pub fn respond(&self, clock: &Clock) -> Response {
        Json(self.body(clock)).into_response()
    }
}

/// WeChat's rid looks like `6543a1b2-1c3d4e5f-0a1b2c3d`: the unix time in hex, then random hex.
fn rid(clock: &Clock) -> String {
    let secs = u32::try_from(clock.now().timestamp()).unwrap_or(u32::MAX);
    let (a, b): (u32, u32) = (rand::random(), rand::random());
    format!("{secs:08x}-{a:08x}-{b:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errmsg_carries_a_rid() {
        let clock = Clock::default();
        let body = WxError::new(INVALID_OPENID).body(&clock);
        assert_eq!(body["errcode"], 40003);
        let msg = body["errmsg"].as_str().unwrap_or_default();
        let rid = msg.strip_prefix("invalid openid rid: ").unwrap_or_default();
        let parts: Vec<&str> = rid.split('-').collect();
        assert_eq!(parts.len(), 3, "{msg}");
        assert!(
            parts
                .iter()
                .all(|p| p.len() == 8 && p.chars().all(|c| c.is_ascii_hexdigit()))
        );
    }
}
