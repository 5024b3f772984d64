//! SMS through Tencent Cloud SMS (API 3.0 `SendSms`, TC3-HMAC-SHA256) or Aliyun SMS (Dysmsapi
//! 2017-05-25 `SendSms`, the signed RPC API). The provider is the account's: each
//! `[sender.sms."<account>"]` names its `provider`, credentials, base URL, sign name and (Tencent)
//! SDK app id and region.
//!
//! One job is one recipient, so one number per call: its own result (Tencent's `SendStatusSet`
//! entry; Aliyun's one `Code`) decides. The provider's id of the message (Tencent `SerialNo`,
//! Aliyun `BizId`) is the delivery's provider message id, which the delivery receipt
//! (`sid`/`biz_id`) names, so the callback receiver can match it (docs/callbacks.md).

pub mod aliyun;
pub mod tencent;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use herald_contract::v1::DeliveryJob;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::channel::{AlertKind, Attempt, Channel, Defer, FailureKind, NarrowerLimit};
use crate::limit::RateLimit;
use crate::meters;

/// Which SMS provider an account is with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmsProvider {
    /// Tencent Cloud SMS, API 3.0.
    TencentSms,
    /// Aliyun (Alibaba Cloud) SMS, Dysmsapi 2017-05-25.
    AliyunSms,
}

impl SmsProvider {
    pub fn label(self) -> &'static str {
        match self {
            SmsProvider::TencentSms => "tencent_sms",
            SmsProvider::AliyunSms => "aliyun_sms",
        }
    }

    fn default_base_url(self) -> &'static str {
        match self {
            SmsProvider::TencentSms => "https://sms.tencentcloudapi.com",
            SmsProvider::AliyunSms => "https://dysmsapi.aliyuncs.com",
        }
    }
}

/// `[sender.sms."<account>"]`: one SMS provider account. The key pair comes from the
/// environment or a secret store in production (`HERALD_SENDER__SMS__<ID>__KEY_SECRET`); the
/// secret is never logged.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SmsAccountSettings {
    /// `tencent_sms` or `aliyun_sms`.
    pub provider: Option<SmsProvider>,
    /// Tencent `SecretId`, Aliyun `AccessKeyId`.
    #[serde(alias = "secret_id", alias = "access_key_id")]
    pub key_id: String,
    /// Tencent `SecretKey`, Aliyun `AccessKeySecret`.
    #[serde(alias = "secret_key", alias = "access_key_secret")]
    pub key_secret: String,
    /// The API's base URL; empty: the provider's public endpoint
    /// (`https://sms.tencentcloudapi.com`, `https://dysmsapi.aliyuncs.com`).
    pub base_url: String,
    /// Tencent `X-TC-Region` (`ap-guangzhou` when empty); Aliyun `RegionId` (`cn-hangzhou`).
    pub region: String,
    /// Tencent `SmsSdkAppId` (the SMS application, `1400…`); unused by Aliyun.
    pub sdk_app_id: String,
    /// The approved signature (签名), e.g. `腾讯云`, shown as 【…】 before the text.
    pub sign_name: String,
    /// What one phone number may receive from this account (none by default: the providers
    /// refuse past their own per-number limits, and those answers defer). Set it under the
    /// provider's (Tencent's default: one a 30 s, five an hour) to keep sends from being
    /// refused at all: `{ per_second = 0.033, burst = 1 }`.
    pub number_rate_limit: Option<RateLimit>,
}

impl std::fmt::Debug for SmsAccountSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsAccountSettings")
            .field("provider", &self.provider)
            .field("key_id", &self.key_id)
            .field("key_secret", &"***")
            .field("base_url", &self.base_url)
            .field("region", &self.region)
            .field("sdk_app_id", &self.sdk_app_id)
            .field("sign_name", &self.sign_name)
            .field("number_rate_limit", &self.number_rate_limit)
            .finish()
    }
}

/// An account checked at start: everything a send needs.
#[derive(Clone)]
pub(crate) struct Account {
    pub provider: SmsProvider,
    pub key_id: String,
    pub key_secret: String,
    pub url: reqwest::Url,
    pub region: String,
    pub sdk_app_id: String,
    pub sign_name: String,
    pub number_rate_limit: Option<RateLimit>,
}

impl Account {
    fn from_settings(id: &str, settings: &SmsAccountSettings) -> Result<Self, String> {
        let name = |field: &str| format!("sender.sms.{id}.{field}");
        let provider = settings
            .provider
            .ok_or_else(|| format!("{}: tencent_sms or aliyun_sms", name("provider")))?;
        for (field, value) in [
            ("key_id", &settings.key_id),
            ("key_secret", &settings.key_secret),
            ("sign_name", &settings.sign_name),
        ] {
            if value.trim().is_empty() {
                return Err(format!("{}: required", name(field)));
            }
        }
        if provider == SmsProvider::TencentSms && settings.sdk_app_id.trim().is_empty() {
            return Err(format!("{}: required for tencent_sms", name("sdk_app_id")));
        }
        let base = if settings.base_url.trim().is_empty() {
            provider.default_base_url()
        } else {
            settings.base_url.trim()
        };
        let url = reqwest::Url::parse(base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .and_then(|u| u.join("/").ok())
            .ok_or_else(|| format!("{}: not an http(s) URL", name("base_url")))?;
        let region = match (settings.region.trim(), provider) {
            ("", SmsProvider::TencentSms) => "ap-guangzhou".to_string(),
            ("", SmsProvider::AliyunSms) => "cn-hangzhou".to_string(),
            (region, _) => region.to_string(),
        };
        Ok(Self {
            provider,
            key_id: settings.key_id.trim().to_string(),
            key_secret: settings.key_secret.clone(),
            url,
            region,
            sdk_app_id: settings.sdk_app_id.trim().to_string(),
            sign_name: settings.sign_name.clone(),
            number_rate_limit: settings.number_rate_limit,
        })
    }

    /// `host[:port]` as the HTTP client sends it in `Host` (the port only when not the
    /// scheme's default), which Tencent's signature covers.
    pub(crate) fn host(&self) -> String {
        let host = self.url.host_str().unwrap_or_default();
        match self.url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }
}

/// A phone number as an operator may read it in logs: `138****5678`.
pub fn mask_phone(phone: &str) -> String {
    let digits: Vec<char> = phone.chars().filter(char::is_ascii_digit).collect();
    // The national number: drop a +86 / 0086 / 86 prefix before an 11-digit mainland number.
    let national: &[char] = if digits.len() > 11 && digits.len() - 11 <= 4 {
        &digits[digits.len() - 11..]
    } else {
        &digits
    };
    if national.len() < 7 {
        return "***".into();
    }
    let head: String = national[..3].iter().collect();
    let tail: String = national[national.len() - 4..].iter().collect();
    format!("{head}****{tail}")
}

/// A recipient's number, normalised: `(country code, national number)`. Accepts `+86 138…`,
/// `0086138…`, `138…` (an 11-digit number starting with 1 is mainland China), spaces, dashes
/// and brackets. `None` when it is not a number at all.
pub fn parse_phone(raw: &str) -> Option<(String, String)> {
    let trimmed = raw.trim();
    let international = trimmed.starts_with('+') || trimmed.starts_with("00");
    if !trimmed
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '(' | ')'))
        || trimmed.matches('+').count() > 1
        || (trimmed.contains('+') && !trimmed.starts_with('+'))
    {
        return None;
    }
    let mut digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    if !international {
        // A national number: mainland China's 11-digit mobile numbers.
        return (digits.len() == 11 && digits.starts_with('1')).then(|| ("86".to_string(), digits));
    }
    if trimmed.starts_with("00") {
        digits.drain(..2);
    }
    if !(6..=15).contains(&digits.len()) {
        return None;
    }
    // Country codes are 1 to 3 digits; China's is the one this sender must split exactly.
    if let Some(national) = digits.strip_prefix("86") {
        return Some(("86".into(), national.to_string()));
    }
    let code_len = if digits.starts_with('1') || digits.starts_with('7') {
        1
    } else {
        2
    };
    let (code, national) = digits.split_at(code_len);
    Some((code.to_string(), national.to_string()))
}

/// A provider's answer, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Transient; `true`: the provider itself failed (counts toward its breaker).
    Retry(bool),
    Defer(Defer, Option<AlertKind>),
    Permanent(FailureKind),
}

/// The template's id and parameters, from the `sms` variant's rendered payload.
pub(crate) struct Rendered {
    pub template_id: String,
    pub params: Params,
}

pub(crate) enum Params {
    Named(BTreeMap<String, String>),
    Positional(Vec<String>),
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        // Numbers travel as doubles in the job's Struct: `2.0` was a template's `2`.
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn rendered(job: &DeliveryJob) -> Result<Rendered, Attempt> {
    let payload = job
        .payload
        .as_ref()
        .and_then(|p| serde_json::to_value(p).ok())
        .unwrap_or_default();
    if payload.get("text").is_some() {
        return Err(Attempt::failed(
            "sms_text",
            "Tencent Cloud and Aliyun SMS send approved templates only: give the sms variant \
             template_ids and params instead of text",
            FailureKind::Template,
        ));
    }
    let Some(template_id) = payload
        .get("template_id")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    else {
        return Err(Attempt::failed(
            "sms_template",
            "the sms payload has no template_id",
            FailureKind::Template,
        ));
    };
    let params = match payload.get("params") {
        None | Some(Value::Null) => Params::Positional(Vec::new()),
        Some(Value::Array(items)) => Params::Positional(items.iter().map(text_of).collect()),
        Some(Value::Object(map)) => {
            Params::Named(map.iter().map(|(k, v)| (k.clone(), text_of(v))).collect())
        }
        Some(_) => {
            return Err(Attempt::failed(
                "sms_template",
                "the sms payload's params are neither a list nor a map",
                FailureKind::Template,
            ));
        }
    };
    Ok(Rendered {
        template_id: template_id.to_string(),
        params,
    })
}

/// The `sms` channel: every `[sender.sms.*]` account, each with its provider.
pub struct Sms {
    http: reqwest::Client,
    accounts: BTreeMap<String, Account>,
}

impl Sms {
    /// Checks every account up front: a missing credential or a bad URL stops the sender at
    /// start with the setting's name.
    pub fn new(
        http: reqwest::Client,
        settings: &BTreeMap<String, SmsAccountSettings>,
    ) -> Result<Self, String> {
        let accounts = settings
            .iter()
            .map(|(id, s)| Account::from_settings(id, s).map(|a| (id.clone(), a)))
            .collect::<Result<_, _>>()?;
        Ok(Self { http, accounts })
    }

    async fn attempt(&self, job: &DeliveryJob, delivery_id: Uuid) -> Attempt {
        let Some(account) = self.accounts.get(&job.provider_account) else {
            return Attempt::failed(
                "config",
                format!("no [sender.sms.{}] configured", job.provider_account),
                FailureKind::Config,
            );
        };
        let Some(phone) = parse_phone(&job.recipient) else {
            return Attempt::failed(
                "invalid_phone",
                format!("`{}` is not a phone number", mask_phone(&job.recipient)),
                FailureKind::Recipient,
            );
        };
        let rendered = match rendered(job) {
            Ok(rendered) => rendered,
            Err(attempt) => return attempt,
        };
        let provider = account.provider.label();
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "POST",
            otel.name = %format!("POST {provider} SendSms"),
            otel.kind = "client",
            http.request.method = "POST",
            server.address = %account.host(),
            herald.provider.errcode = tracing::field::Empty,
        );
        let answer = match account.provider {
            SmsProvider::TencentSms => {
                tencent::send(&self.http, account, &phone, &rendered, delivery_id)
                    .instrument(span.clone())
                    .await
            }
            SmsProvider::AliyunSms => {
                aliyun::send(&self.http, account, &phone, &rendered, delivery_id)
                    .instrument(span.clone())
                    .await
            }
        };
        meters::provider_call(&job.channel, started.elapsed());
        let answer = match answer {
            Ok(answer) => answer,
            Err(attempt) => {
                let code = match &attempt {
                    Attempt::Retry { code, .. } | Attempt::Failed { code, .. } => code.clone(),
                    _ => "transport".into(),
                };
                meters::provider_answer(provider, &code);
                return attempt;
            }
        };
        span.record("herald.provider.errcode", answer.code.as_str());
        meters::provider_answer(provider, &answer.code);
        let outcome = match account.provider {
            SmsProvider::TencentSms => tencent::classify(&answer.code),
            SmsProvider::AliyunSms => aliyun::classify(&answer.code, &answer.message),
        };
        let Answer { code, message, .. } = answer;
        match outcome {
            Outcome::Sent => match answer.msgid {
                Some(msgid) if !msgid.is_empty() => {
                    tracing::debug!(provider, to = %mask_phone(&job.recipient), %msgid, "SMS accepted");
                    Attempt::Sent(msgid)
                }
                _ => Attempt::Retry {
                    code: "no_msgid".into(),
                    message: format!("{provider} accepted the SMS without a message id"),
                    provider_down: false,
                },
            },
            Outcome::Retry(provider_down) => Attempt::Retry {
                code,
                message,
                provider_down,
            },
            Outcome::Defer(defer, alert) => Attempt::Defer {
                code,
                message,
                defer,
                alert,
            },
            Outcome::Permanent(kind) => Attempt::failed(code, message, kind),
        }
    }
}

/// A provider's answer for the one number: its code, words and message id.
pub(crate) struct Answer {
    pub code: String,
    pub message: String,
    pub msgid: Option<String>,
}

/// The attempt for a call that got no usable answer.
/// The most of a provider's answer that is read: both answer with a few hundred bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Sends `request` with the trace headers and reads the answer's status and (bounded) body;
/// a failure to reach the provider or to read its answer is a retry.
pub(crate) async fn exchange(
    provider: &str,
    mut request: reqwest::RequestBuilder,
) -> Result<(reqwest::StatusCode, String), Attempt> {
    for (name, value) in herald_telemetry::trace_headers() {
        request = request.header(name, value);
    }
    let response = request.send().await.map_err(|e| transport(provider, e))?;
    let status = response.status();
    let body = herald_webhook::target::read_bounded(response, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| transport(provider, e))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An answer that is not the provider's JSON: the gateway or the network, so a retry.
pub(crate) fn unreadable(provider: &str, status: reqwest::StatusCode, missing: &str) -> Attempt {
    Attempt::Retry {
        code: if status.is_server_error() {
            "http_5xx".into()
        } else {
            "transport".into()
        },
        message: format!("{provider} answered HTTP {status} without {missing}"),
        provider_down: true,
    }
}

pub(crate) fn transport(provider: &str, error: reqwest::Error) -> Attempt {
    let code = if error.is_timeout() {
        "timeout"
    } else {
        "transport"
    };
    Attempt::Retry {
        code: code.into(),
        message: format!("{provider}: {}", error.without_url()),
        provider_down: true,
    }
}

/// Shared by the tables: a per-number frequency limit waits this long.
pub(crate) const MINUTE: Duration = Duration::from_secs(60);
pub(crate) const HOUR: Duration = Duration::from_secs(3600);

impl Channel for Sms {
    fn name(&self) -> &'static str {
        herald_contract::channels::SMS
    }

    fn provider(&self) -> &'static str {
        "sms"
    }

    fn narrower_limits(&self, job: &DeliveryJob) -> Vec<NarrowerLimit> {
        let limit = self
            .accounts
            .get(&job.provider_account)
            .and_then(|account| account.number_rate_limit);
        match (limit, parse_phone(&job.recipient)) {
            (Some(limit), Some((country, number))) => vec![NarrowerLimit {
                scope: "number",
                id: format!("{country}{number}"),
                limit,
            }],
            // A number that does not parse fails in the send, with its reason.
            _ => Vec::new(),
        }
    }

    fn send<'a>(
        &'a self,
        job: &'a DeliveryJob,
        delivery_id: Uuid,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(self.attempt(job, delivery_id))
    }
}

/// RFC 3986 percent-encoding as both providers' signatures want it: unreserved characters
/// (`A-Z a-z 0-9 - _ . ~`) as they are, every other byte of the UTF-8 as `%XY` (so a space is
/// `%20`, `*` is `%2A`).
pub fn percent_encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, RFC3986_RESERVED).to_string()
}

/// Everything but RFC 3986's unreserved characters.
const RFC3986_RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_normalised() {
        let cn = |n: &str| Some(("86".to_string(), n.to_string()));
        assert_eq!(parse_phone("+8613800138000"), cn("13800138000"));
        assert_eq!(parse_phone("+86 138-0013-8000"), cn("13800138000"));
        assert_eq!(parse_phone("008613800138000"), cn("13800138000"));
        assert_eq!(parse_phone("13800138000"), cn("13800138000"));
        assert_eq!(
            parse_phone("+85261234567"),
            Some(("85".into(), "261234567".into()))
        );
        assert_eq!(
            parse_phone("+14155550100"),
            Some(("1".into(), "4155550100".into()))
        );
        assert_eq!(parse_phone("12345"), None);
        assert_eq!(parse_phone("+86abc"), None);
        assert_eq!(parse_phone("1380013800+0"), None);
        assert_eq!(parse_phone(""), None);
    }

    #[test]
    fn phones_are_masked() {
        assert_eq!(mask_phone("+8613812345678"), "138****5678");
        assert_eq!(mask_phone("13812345678"), "138****5678");
        assert_eq!(mask_phone("123"), "***");
    }

    #[test]
    fn percent_encoding_follows_rfc3986() {
        assert_eq!(percent_encode("a b*c~d/e+f"), "a%20b%2Ac~d%2Fe%2Bf");
        assert_eq!(percent_encode("阿"), "%E9%98%BF");
    }

    #[test]
    fn accounts_are_checked_at_start() {
        let settings = SmsAccountSettings {
            provider: Some(SmsProvider::TencentSms),
            key_id: "AKID".into(),
            key_secret: "secret".into(),
            sign_name: "Herald".into(),
            ..Default::default()
        };
        let error = Account::from_settings("a", &settings)
            .err()
            .expect("no sdk_app_id");
        assert!(error.contains("sender.sms.a.sdk_app_id"), "{error}");
        let account = Account::from_settings(
            "a",
            &SmsAccountSettings {
                sdk_app_id: "1400000001".into(),
                base_url: "http://127.0.0.1:8099".into(),
                ..settings.clone()
            },
        )
        .expect("valid");
        assert_eq!(account.host(), "127.0.0.1:8099");
        assert_eq!(account.region, "ap-guangzhou");
        let public = Account::from_settings(
            "a",
            &SmsAccountSettings {
                sdk_app_id: "1400000001".into(),
                ..settings.clone()
            },
        )
        .expect("valid");
        assert_eq!(public.host(), "sms.tencentcloudapi.com");
        let shown = format!("{settings:?}");
        assert!(!shown.contains("secret\""), "{shown}");
    }

    #[test]
    fn a_number_limit_applies_by_the_normalised_number() {
        let limit = RateLimit {
            per_second: 1.0 / 30.0,
            burst: 1,
        };
        let mut accounts = BTreeMap::new();
        accounts.insert(
            "limited".to_string(),
            SmsAccountSettings {
                provider: Some(SmsProvider::AliyunSms),
                key_id: "LTAI".into(),
                key_secret: "secret".into(),
                sign_name: "Herald".into(),
                number_rate_limit: Some(limit),
                ..Default::default()
            },
        );
        let sms = Sms::new(reqwest::Client::new(), &accounts).expect("valid");
        let limits = |to: &str| {
            sms.narrower_limits(&DeliveryJob {
                provider_account: "limited".into(),
                recipient: to.into(),
                ..Default::default()
            })
        };
        let number = NarrowerLimit {
            scope: "number",
            id: "8613800138000".into(),
            limit,
        };
        assert_eq!(limits("+86 138-0013-8000"), std::slice::from_ref(&number));
        assert_eq!(limits("13800138000"), [number]);
        assert!(limits("not a number").is_empty());
    }
}
