//! WeChat template and subscribe messages: the HTTP calls and the error-code table.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use herald_contract::v1::DeliveryJob;
use serde::Deserialize;
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

pub use crate::channel::{AlertKind, Defer, FailureKind};
use crate::channel::{Attempt, Channel, token_failure};
use crate::meters;

/// What to do after an answer from WeChat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Sent,
    /// The token was rejected: report it to the token service and retry once at once.
    RefreshToken,
    /// Transient: retry from the next tier of the channel's schedule (counts as an attempt).
    Retry,
    /// A quota or an account block: wait, in state `deferred`, without using up an attempt.
    Defer(Defer),
    /// Will never succeed as sent.
    Permanent(FailureKind),
}

/// The classification table of ../shared/WECHAT.md, one row per errcode.
pub fn classify(errcode: i64) -> Action {
    match errcode {
        0 => Action::Sent,
        -1 => Action::Retry,
        40001 | 40014 | 42001 => Action::RefreshToken,
        40002 | 40013 | 40125 | 48001 => Action::Permanent(FailureKind::Config),
        40003 | 43004 | 43101 => Action::Permanent(FailureKind::Recipient),
        40036 | 40037 | 41030 | 47003 => Action::Permanent(FailureKind::Template),
        45009 => Action::Defer(Defer::QuotaReset),
        45011 => Action::Defer(Defer::For(Duration::from_secs(60))),
        // Risky IP awaiting the admin's confirmation: nothing works until then.
        89503 => Action::Defer(Defer::For(Duration::from_secs(600))),
        _ => Action::Permanent(FailureKind::Unknown),
    }
}

/// Whether an answer needs an operator, and which kind of problem it is.
pub fn alert(action: Action, errcode: i64) -> Option<AlertKind> {
    match action {
        Action::Permanent(FailureKind::Config) => Some(AlertKind::Config),
        Action::Permanent(FailureKind::Template) => Some(AlertKind::Template),
        Action::Permanent(FailureKind::Unknown) => Some(AlertKind::UnknownCode),
        Action::Defer(_) if errcode == 89503 => Some(AlertKind::IpBlocked),
        Action::Defer(Defer::QuotaReset) => Some(AlertKind::Quota),
        _ => None,
    }
}

/// WeChat's answer to a send.
#[derive(Debug, Clone, Deserialize)]
pub struct SendAnswer {
    #[serde(default)]
    pub errcode: i64,
    #[serde(default)]
    pub errmsg: String,
    /// Can exceed 2^53: kept as the JSON number's exact text.
    #[serde(default)]
    pub msgid: Option<serde_json::Number>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("wechat unreachable: {0}")]
    Http(#[from] reqwest::Error),
    #[error("wechat answered HTTP {0}")]
    Status(u16),
}

/// Template messages (`/cgi-bin/message/template/send`).
pub const TEMPLATE_SEND: &str = "/cgi-bin/message/template/send";
/// Official Account subscribe messages.
pub const SUBSCRIBE_BIZSEND: &str = "/cgi-bin/message/subscribe/bizsend";
/// Mini program subscribe messages.
pub const SUBSCRIBE_SEND: &str = "/cgi-bin/message/subscribe/send";

/// POSTs `body` to `path` with the token; a non-2xx answer is a transport failure.
pub async fn call(
    http: &reqwest::Client,
    base_url: &str,
    path: &str,
    access_token: &str,
    body: &Value,
) -> Result<SendAnswer, TransportError> {
    let mut request = http
        .post(format!("{base_url}{path}"))
        .query(&[("access_token", access_token)])
        .json(body);
    for (name, value) in herald_telemetry::trace_headers() {
        request = request.header(name, value);
    }
    let response = request.send().await?;
    let status = response.status();
    if !status.is_success() {
        return Err(TransportError::Status(status.as_u16()));
    }
    Ok(response.json::<SendAnswer>().await?)
}

/// Which kind of WeChat message a channel sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `wechat.template`: Official Account template messages.
    Template,
    /// `wechat.subscribe`: subscribe messages, through the Official Account's `bizsend` or the
    /// mini program's `subscribe/send` depending on the sending account's kind.
    Subscribe,
}

/// A WeChat channel: template or subscribe messages.
pub struct Wechat {
    shared: super::Shared,
    base_url: String,
    api: Api,
    /// Accounts configured as mini programs (the rest are Official Accounts).
    mini_programs: std::collections::BTreeSet<String>,
}

impl Wechat {
    pub fn new(shared: super::Shared, settings: &crate::SenderSettings, api: Api) -> Self {
        let mini_programs = settings
            .accounts
            .iter()
            .filter(|(_, a)| a.kind == crate::limit::AccountKind::MiniProgram)
            .map(|(id, _)| id.clone())
            .collect();
        Self {
            shared,
            base_url: settings.wechat_base_url.clone(),
            api,
            mini_programs,
        }
    }

    /// The endpoint and body for one send to `touser`.
    fn request(&self, job: &DeliveryJob, delivery_id: Uuid) -> (&'static str, Value) {
        let mut body = job
            .payload
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or_default();
        let path = match self.api {
            Api::Template => TEMPLATE_SEND,
            Api::Subscribe if self.mini_programs.contains(&job.provider_account) => SUBSCRIBE_SEND,
            Api::Subscribe => SUBSCRIBE_BIZSEND,
        };
        if let Some(object) = body.as_object_mut() {
            object.insert("touser".into(), Value::String(job.recipient.clone()));
            // The delivery id is stable across attempts, so WeChat de-duplicates a template
            // send whose answer we lost (crash, timeout) within its 10-minute window.
            // Subscribe messages have no such key: a retry after a lost answer may repeat
            // one (WeChat's own limit: it uses up another acceptance, or fails with 43101).
            if self.api == Api::Template {
                object.insert(
                    "client_msg_id".into(),
                    Value::String(delivery_id.simple().to_string()),
                );
            }
            // The mini program API does not take the Official Account's `miniprogram` link.
            if path == SUBSCRIBE_SEND {
                object.remove("miniprogram");
            }
        }
        (path, body)
    }

    /// One provider call, plus one immediate retry with a fresh token if WeChat rejected ours.
    async fn attempt(&self, job: &DeliveryJob, delivery_id: Uuid) -> Attempt {
        let account = job.provider_account.as_str();
        let tokens = &self.shared.tokens;
        let mut token = match tokens.token(account).await {
            Ok(token) => token,
            Err(e) => return token_failure(e),
        };
        let (path, body) = self.request(job, delivery_id);
        let mut refreshed = false;
        loop {
            let started = std::time::Instant::now();
            let answer = call(
                &self.shared.http,
                &self.base_url,
                path,
                &token.access_token,
                &body,
            )
            .instrument(tracing::info_span!(
                "POST",
                otel.name = %format!("POST {path}"),
                otel.kind = "client",
                http.request.method = "POST",
                url.path = path,
                server.address = %self.base_url,
            ))
            .await;
            meters::provider_call(&job.channel, started.elapsed());
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    meters::provider_answer("wechat", "transport");
                    // Timeouts, resets and 5xx: the outcome may be unknown; a template retry
                    // carries the same client_msg_id, so WeChat sends it at most once.
                    return Attempt::Retry {
                        code: "transport".into(),
                        message: e.to_string(),
                        provider_down: true,
                    };
                }
            };
            tracing::Span::current().record("herald.provider.errcode", answer.errcode);
            let code = answer.errcode.to_string();
            meters::provider_answer("wechat", &code);
            let action = classify(answer.errcode);
            let alert = alert(action, answer.errcode);
            return match action {
                Action::Sent => match answer.msgid {
                    Some(msgid) => Attempt::Sent(msgid.to_string()),
                    None => Attempt::Retry {
                        code: "no_msgid".into(),
                        message: "success answer without msgid".into(),
                        provider_down: false,
                    },
                },
                Action::RefreshToken if !refreshed => {
                    refreshed = true;
                    match tokens.report_rejected(account, &token.access_token).await {
                        Ok(fresh) => {
                            token = fresh;
                            continue;
                        }
                        Err(e) => token_failure(e),
                    }
                }
                // A fresh token rejected again is a real failure of this attempt, not a loop.
                Action::RefreshToken => Attempt::Retry {
                    code,
                    message: answer.errmsg,
                    provider_down: false,
                },
                // `-1`: WeChat is busy, which counts toward its breaker.
                Action::Retry => Attempt::Retry {
                    code,
                    message: answer.errmsg,
                    provider_down: true,
                },
                Action::Defer(defer) => Attempt::Defer {
                    code,
                    message: answer.errmsg,
                    defer,
                    alert,
                },
                Action::Permanent(kind) => Attempt::Failed {
                    code,
                    message: answer.errmsg,
                    kind,
                    alert,
                },
            };
        }
    }
}

impl Channel for Wechat {
    fn name(&self) -> &'static str {
        match self.api {
            Api::Template => herald_contract::channels::WECHAT_TEMPLATE,
            Api::Subscribe => herald_contract::channels::WECHAT_SUBSCRIBE,
        }
    }

    fn provider(&self) -> &'static str {
        "wechat"
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

    #[test]
    fn table_follows_the_provider_facts() {
        assert_eq!(classify(0), Action::Sent);
        assert_eq!(classify(-1), Action::Retry);
        for code in [40001, 40014, 42001] {
            assert_eq!(classify(code), Action::RefreshToken);
        }
        assert_eq!(classify(40003), Action::Permanent(FailureKind::Recipient));
        assert_eq!(classify(43004), Action::Permanent(FailureKind::Recipient));
        assert_eq!(classify(40037), Action::Permanent(FailureKind::Template));
        assert_eq!(classify(40125), Action::Permanent(FailureKind::Config));
        assert_eq!(classify(45009), Action::Defer(Defer::QuotaReset));
        assert_eq!(
            classify(45011),
            Action::Defer(Defer::For(Duration::from_secs(60)))
        );
        assert_eq!(classify(99999), Action::Permanent(FailureKind::Unknown));
        assert_eq!(alert(classify(40037), 40037), Some(AlertKind::Template));
        assert_eq!(alert(classify(40013), 40013), Some(AlertKind::Config));
        assert_eq!(alert(classify(45009), 45009), Some(AlertKind::Quota));
        assert_eq!(alert(classify(89503), 89503), Some(AlertKind::IpBlocked));
        assert_eq!(alert(classify(43101), 43101), None);
        assert_eq!(alert(classify(45011), 45011), None);
        assert_eq!(alert(classify(-1), -1), None);
    }

    #[test]
    fn msgid_beyond_2_pow_53_is_kept_exactly() {
        let answer: SendAnswer =
            serde_json::from_str(r#"{"errcode":0,"errmsg":"ok","msgid":3000000000000000001}"#)
                .expect("answer");
        assert_eq!(
            answer.msgid.map(|n| n.to_string()).as_deref(),
            Some("3000000000000000001")
        );
    }
}
