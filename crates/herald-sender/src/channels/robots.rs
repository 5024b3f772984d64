//! Group robots of WeCom, DingTalk and Feishu (Lark): a POST (signed for DingTalk and Feishu)
//! to the robot's webhook.
//!
//! The two signing schemes differ (../shared/WECHAT.md): DingTalk signs `timestamp_ms + "\n" +
//! secret` with the secret as HMAC key and sends the signature URL-encoded in the query;
//! Feishu uses `timestamp_s + "\n" + secret` as the *key* over an empty message and sends it in
//! the body. Robots send to a group, so the robot (a provider account configured under
//! `[sender.robots.<id>]`) is also the recipient. They have no delivery receipts: an accepted
//! message ends as `sent`, with the delivery id standing in for a provider message id.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use herald_contract::v1::DeliveryJob;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use tracing::Instrument;
use uuid::Uuid;

use crate::channel::{Attempt, Channel, Defer, FailureKind};
use crate::limit::RateLimit;
use crate::meters;

/// `[sender.robots."<account>"]`: one group robot. The URL holds the robot's token and the
/// secret signs requests: both come from the environment or a secret store in production
/// (`HERALD_SENDER__ROBOTS__<ID>__URL`, `..._SECRET`), and neither is ever logged.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RobotSettings {
    /// The robot's webhook, e.g. `https://oapi.dingtalk.com/robot/send?access_token=…` or
    /// `https://open.feishu.cn/open-apis/bot/v2/hook/…`.
    pub url: String,
    /// The signing secret (`SEC…` for DingTalk), when the robot's security setting is
    /// "signature"; robots secured by keywords or IP lists have none.
    pub secret: Option<String>,
}

impl std::fmt::Debug for RobotSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RobotSettings")
            .field("url", &"***")
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .finish()
    }
}

type HmacSha256 = Hmac<Sha256>;

/// DingTalk: `base64(HMAC-SHA256(key = secret, msg = timestamp_ms + "\n" + secret))`, before
/// URL encoding.
pub fn dingtalk_sign(timestamp_ms: i64, secret: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{timestamp_ms}\n{secret}").as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Feishu: `base64(HMAC-SHA256(key = timestamp_s + "\n" + secret, msg = ""))`.
pub fn feishu_sign(timestamp_s: i64, secret: &str) -> String {
    let key = format!("{timestamp_s}\n{secret}");
    let mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    BASE64.encode(mac.finalize().into_bytes())
}

/// Which robot protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// WeCom group robots: the key in the URL is the only credential.
    Wecom,
    Dingtalk,
    Feishu,
}

impl Kind {
    fn provider(self) -> &'static str {
        match self {
            Kind::Wecom => "wecom",
            Kind::Dingtalk => "dingtalk",
            Kind::Feishu => "feishu",
        }
    }
}

/// DingTalk's answer codes, from its robot documentation.
pub fn classify_dingtalk(errcode: i64, errmsg: &str) -> Outcome {
    match errcode {
        0 => Outcome::Sent,
        -1 => Outcome::Retry,
        // Over 20 messages a minute: the robot is blocked for 10 minutes.
        130101 => Outcome::Defer(Duration::from_secs(600)),
        // Security check: a wrong signature or missing keyword will not pass on a retry; a
        // timestamp outside the hour is our clock.
        310000 if errmsg.contains("timestamp") => Outcome::Retry,
        310000 => Outcome::Permanent(FailureKind::Config),
        // Token missing or unknown, robot disabled.
        300001 | 300005 | 400013 => Outcome::Permanent(FailureKind::Config),
        // A malformed message (wrong msgtype or field).
        40035 | 43005 | 430102 => Outcome::Permanent(FailureKind::Template),
        _ => Outcome::Permanent(FailureKind::Unknown),
    }
}

/// WeCom group robot answer codes.
pub fn classify_wecom(errcode: i64) -> Outcome {
    match errcode {
        0 => Outcome::Sent,
        -1 => Outcome::Retry,
        // Over 20 messages a minute: wait the minute out.
        45009 => Outcome::Defer(Duration::from_secs(60)),
        // The key is wrong or the robot was removed from its group.
        93000 | 93004 => Outcome::Permanent(FailureKind::Config),
        // Markdown over 4096 bytes, text over 2048, a malformed message.
        40058 | 40008 | 44004 => Outcome::Permanent(FailureKind::Template),
        _ => Outcome::Permanent(FailureKind::Unknown),
    }
}

/// Feishu's answer codes, from its custom robot documentation.
pub fn classify_feishu(code: i64) -> Outcome {
    match code {
        0 => Outcome::Sent,
        // Rate limited (5/s, 100/min): the window is at most a minute.
        9499 | 11232 => Outcome::Defer(Duration::from_secs(60)),
        // Signature or timestamp mismatch, keyword or IP check, unknown hook.
        19021 | 19022 | 19024 | 19001 => Outcome::Permanent(FailureKind::Config),
        // Malformed message (parameters).
        19002 => Outcome::Permanent(FailureKind::Template),
        _ => Outcome::Permanent(FailureKind::Unknown),
    }
}

/// A robot answer, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    Retry,
    Defer(Duration),
    Permanent(FailureKind),
}

/// A DingTalk or Feishu robot channel.
pub struct Robots {
    http: reqwest::Client,
    kind: Kind,
    robots: std::collections::BTreeMap<String, RobotSettings>,
}

impl Robots {
    pub fn new(
        http: reqwest::Client,
        kind: Kind,
        robots: std::collections::BTreeMap<String, RobotSettings>,
    ) -> Self {
        Self { http, kind, robots }
    }

    async fn attempt(&self, job: &DeliveryJob, delivery_id: Uuid) -> Attempt {
        let Some(robot) = self.robots.get(&job.provider_account) else {
            return Attempt::failed(
                "config",
                format!(
                    "no [sender.robots.{}] configured for this robot",
                    job.provider_account
                ),
                FailureKind::Config,
            );
        };
        let mut body = job
            .payload
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or_default();
        let now = chrono::Utc::now();
        let mut request = match (self.kind, robot.secret.as_deref()) {
            (Kind::Dingtalk, Some(secret)) => {
                let timestamp = now.timestamp_millis();
                self.http.post(&robot.url).query(&[
                    ("timestamp", timestamp.to_string()),
                    ("sign", dingtalk_sign(timestamp, secret)),
                ])
            }
            (Kind::Feishu, Some(secret)) => {
                let timestamp = now.timestamp();
                if let Some(object) = body.as_object_mut() {
                    object.insert("timestamp".into(), Value::String(timestamp.to_string()));
                    object.insert("sign".into(), Value::String(feishu_sign(timestamp, secret)));
                }
                self.http.post(&robot.url)
            }
            // WeCom robots are not signed; robots without a secret trust their URL alone.
            (Kind::Wecom, _) | (_, None) => self.http.post(&robot.url),
        };
        request = request.json(&body);
        for (name, value) in herald_telemetry::trace_headers() {
            request = request.header(name, value);
        }
        let provider = self.kind.provider();
        let host = reqwest::Url::parse(&robot.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        let started = std::time::Instant::now();
        let answer = async {
            let response = request.send().await?;
            let status = response.status();
            let text = response.text().await?;
            Ok::<_, reqwest::Error>((status, text))
        }
        .instrument(tracing::info_span!(
            "POST",
            otel.name = %format!("POST {provider} robot"),
            otel.kind = "client",
            http.request.method = "POST",
            server.address = %host,
        ))
        .await;
        meters::provider_call(&job.channel, started.elapsed());
        let (status, text) = match answer {
            Ok(answer) => answer,
            Err(e) => {
                meters::provider_answer(provider, "transport");
                return Attempt::Retry {
                    code: "transport".into(),
                    // Without the URL: it carries the robot's token.
                    message: e.without_url().to_string(),
                    provider_down: true,
                };
            }
        };
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        // Feishu answers some errors (rate limits) with HTTP 400 and a JSON code.
        let (code, message) = match self.kind {
            Kind::Wecom | Kind::Dingtalk => (
                answer.get("errcode").and_then(Value::as_i64),
                answer.get("errmsg").and_then(Value::as_str),
            ),
            Kind::Feishu => (
                answer
                    .get("code")
                    .or_else(|| answer.get("StatusCode"))
                    .and_then(Value::as_i64),
                answer
                    .get("msg")
                    .or_else(|| answer.get("StatusMessage"))
                    .and_then(Value::as_str),
            ),
        };
        let Some(code) = code else {
            meters::provider_answer(provider, "transport");
            return Attempt::Retry {
                code: "transport".into(),
                message: format!("{provider} answered HTTP {status} without a code"),
                provider_down: status.is_server_error(),
            };
        };
        let message = message.unwrap_or_default().to_string();
        tracing::Span::current().record("herald.provider.errcode", code);
        meters::provider_answer(provider, &code.to_string());
        let outcome = match self.kind {
            Kind::Wecom => classify_wecom(code),
            Kind::Dingtalk => classify_dingtalk(code, &message),
            Kind::Feishu => classify_feishu(code),
        };
        let code = code.to_string();
        match outcome {
            // No message id from robots: the delivery id stands in.
            Outcome::Sent => Attempt::Sent(delivery_id.to_string()),
            Outcome::Retry => Attempt::Retry {
                code,
                message,
                provider_down: true,
            },
            Outcome::Defer(wait) => Attempt::Defer {
                code,
                message,
                defer: Defer::For(wait),
                alert: None,
            },
            Outcome::Permanent(kind) => Attempt::failed(code, message, kind),
        }
    }
}

impl Channel for Robots {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Wecom => herald_contract::channels::WECOM_ROBOT,
            Kind::Dingtalk => herald_contract::channels::DINGTALK,
            Kind::Feishu => herald_contract::channels::FEISHU,
        }
    }

    fn provider(&self) -> &'static str {
        self.kind.provider()
    }

    /// WeCom and DingTalk: 20 messages a minute per robot. Feishu: 100 a minute and 5 a second: a burst
    /// of 5, then 95 more spread over the minute, so no minute holds more than 100.
    fn default_rate_limit(&self) -> Option<RateLimit> {
        Some(match self.kind {
            Kind::Wecom | Kind::Dingtalk => RateLimit {
                per_second: 20.0 / 60.0,
                burst: 1,
            },
            Kind::Feishu => RateLimit {
                per_second: 95.0 / 60.0,
                burst: 5,
            },
        })
    }

    fn send<'a>(
        &'a self,
        job: &'a DeliveryJob,
        delivery_id: Uuid,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(self.attempt(job, delivery_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ../shared/vectors/crypto.json: the official signing vectors for both robots.
    fn vectors() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/vectors/crypto.json"
        );
        let text = std::fs::read_to_string(path).expect("shared vectors beside the repository");
        serde_json::from_str(&text).expect("vectors are JSON")
    }

    #[test]
    fn dingtalk_signatures_match_the_vectors() {
        let vectors = vectors();
        let cases = vectors["dingtalk_robot_sign"].as_array().expect("cases");
        assert!(!cases.is_empty());
        for case in cases {
            let timestamp: i64 = case["timestamp_ms"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .expect("timestamp");
            let secret = case["secret"].as_str().expect("secret");
            let sign = dingtalk_sign(timestamp, secret);
            assert_eq!(sign, case["sign_base64"].as_str().expect("sign"));
            if let Some(encoded) = case["sign_urlencoded"].as_str() {
                let url =
                    reqwest::Url::parse_with_params("http://x/", &[("sign", &sign)]).expect("url");
                assert_eq!(url.query(), Some(format!("sign={encoded}").as_str()));
            }
        }
    }

    #[test]
    fn feishu_signatures_match_the_vectors() {
        let vectors = vectors();
        let cases = vectors["feishu_robot_sign"].as_array().expect("cases");
        assert!(!cases.is_empty());
        for case in cases {
            let timestamp: i64 = case["timestamp_s"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .expect("timestamp");
            let secret = case["secret"].as_str().expect("secret");
            assert_eq!(
                feishu_sign(timestamp, secret),
                case["sign"].as_str().expect("sign")
            );
        }
    }

    #[test]
    fn answer_tables() {
        assert_eq!(classify_wecom(0), Outcome::Sent);
        assert_eq!(
            classify_wecom(45009),
            Outcome::Defer(Duration::from_secs(60))
        );
        assert_eq!(
            classify_wecom(93000),
            Outcome::Permanent(FailureKind::Config)
        );
        assert_eq!(
            classify_wecom(40058),
            Outcome::Permanent(FailureKind::Template)
        );
        assert_eq!(classify_dingtalk(0, "ok"), Outcome::Sent);
        assert_eq!(
            classify_dingtalk(130101, "send too fast"),
            Outcome::Defer(Duration::from_secs(600))
        );
        assert_eq!(
            classify_dingtalk(310000, "sign not match"),
            Outcome::Permanent(FailureKind::Config)
        );
        assert_eq!(
            classify_dingtalk(310000, "invalid timestamp"),
            Outcome::Retry
        );
        assert_eq!(
            classify_feishu(9499),
            Outcome::Defer(Duration::from_secs(60))
        );
        assert_eq!(
            classify_feishu(19021),
            Outcome::Permanent(FailureKind::Config)
        );
    }

    #[test]
    fn settings_never_show_their_secrets() {
        let robot = RobotSettings {
            url: "https://oapi.dingtalk.com/robot/send?access_token=TOKEN".into(),
            secret: Some("SECsecret".into()),
        };
        let shown = format!("{robot:?}");
        assert!(
            !shown.contains("TOKEN") && !shown.contains("SECsecret"),
            "{shown}"
        );
    }
}
