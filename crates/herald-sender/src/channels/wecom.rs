//! WeCom (企业微信) application messages: `POST /cgi-bin/message/send` with a token from the
//! token service (a `wecom_app` account) and the account's `agent_id`.
//!
//! One job is one member, so WeCom's partial success (`invaliduser` naming some of the
//! addressees) fails exactly the recipients it names. `enable_duplicate_check` makes a retry
//! after a lost answer idempotent: WeCom drops the same content to the same member within
//! `duplicate_check_interval`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use herald_contract::v1::DeliveryJob;
use serde::Deserialize;
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::channel::{Attempt, Channel, Defer, FailureKind, NarrowerLimit, token_failure};
use crate::limit::RateLimit;
use crate::meters;

pub const MESSAGE_SEND: &str = "/cgi-bin/message/send";

/// WeCom's answer to a send.
#[derive(Debug, Clone, Deserialize)]
pub struct SendAnswer {
    #[serde(default)]
    pub errcode: i64,
    #[serde(default)]
    pub errmsg: String,
    /// `|`-separated user ids WeCom refused.
    #[serde(default)]
    pub invaliduser: String,
    #[serde(default)]
    pub msgid: String,
}

/// What an answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Sent,
    RefreshToken,
    /// Transient; `provider_down` when WeCom itself is failing.
    Retry {
        provider_down: bool,
    },
    Defer(Duration),
    Permanent(FailureKind),
}

/// The error table of ../shared/WECHAT.md for WeCom application messages.
pub fn classify(errcode: i64) -> Action {
    match errcode {
        0 => Action::Sent,
        -1 => Action::Retry {
            provider_down: true,
        },
        40014 | 42001 => Action::RefreshToken,
        // The app's API rate limit: wait the window out.
        45009 => Action::Defer(Duration::from_secs(60)),
        // Too many concurrent calls: back off, WeCom is fine.
        45033 => Action::Retry {
            provider_down: false,
        },
        // Every addressee invalid (not a member, or outside the app's visibility).
        81013 => Action::Permanent(FailureKind::Recipient),
        40001 | 40013 | 40056 | 40091 | 301002 | 60020 => Action::Permanent(FailureKind::Config),
        // Empty or malformed content, unknown message type, markdown over 4096 bytes.
        40008 | 44004 | 40058 => Action::Permanent(FailureKind::Template),
        _ => Action::Permanent(FailureKind::Unknown),
    }
}

/// The `wecom` channel.
pub struct Wecom {
    shared: super::Shared,
    base_url: String,
    /// `agent_id` per provider account.
    agents: std::collections::BTreeMap<String, u32>,
    /// Configured per-member limits (`member_rate_limit`) per provider account.
    member_limits: std::collections::BTreeMap<String, RateLimit>,
}

/// WeCom's per-member limit is 30 messages a minute, and it drops the excess without an
/// error. GCRA at 25 a minute with bursts of 5 lets at most 5 + 25 = 30 through in any
/// 60-second window.
pub const MEMBER_RATE_LIMIT: RateLimit = RateLimit {
    per_second: 25.0 / 60.0,
    burst: 5,
};

impl Wecom {
    pub fn new(shared: super::Shared, settings: &crate::SenderSettings) -> Self {
        let agents = settings
            .accounts
            .iter()
            .filter_map(|(id, a)| a.agent_id.map(|agent| (id.clone(), agent)))
            .collect();
        let member_limits = settings
            .accounts
            .iter()
            .filter_map(|(id, a)| a.member_rate_limit.map(|limit| (id.clone(), limit)))
            .collect();
        Self {
            shared,
            base_url: settings.wecom_base_url.clone(),
            agents,
            member_limits,
        }
    }

    async fn attempt(&self, job: &DeliveryJob) -> Attempt {
        let account = job.provider_account.as_str();
        let Some(agent_id) = self.agents.get(account) else {
            return Attempt::failed(
                "config",
                format!("sender.accounts.{account}.agent_id is not set"),
                FailureKind::Config,
            );
        };
        let tokens = &self.shared.tokens;
        let mut token = match tokens.token(account).await {
            Ok(token) => token,
            Err(e) => return token_failure(e),
        };
        let mut body = job
            .payload
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or_default();
        if let Some(object) = body.as_object_mut() {
            object.insert("touser".into(), Value::String(job.recipient.clone()));
            object.insert("agentid".into(), Value::from(*agent_id));
            object.insert("enable_duplicate_check".into(), Value::from(1));
            object.insert("duplicate_check_interval".into(), Value::from(1800));
        }
        let mut refreshed = false;
        loop {
            let started = std::time::Instant::now();
            let answer = async {
                let mut request = self
                    .shared
                    .http
                    .post(format!("{}{MESSAGE_SEND}", self.base_url))
                    .query(&[("access_token", token.access_token.as_str())])
                    .json(&body);
                for (name, value) in herald_telemetry::trace_headers() {
                    request = request.header(name, value);
                }
                let response = request.send().await?;
                let status = response.status();
                if !status.is_success() {
                    return Ok(Err(status.as_u16()));
                }
                Ok::<_, reqwest::Error>(Ok(response.json::<SendAnswer>().await?))
            }
            .instrument(tracing::info_span!(
                "POST",
                otel.name = %format!("POST {MESSAGE_SEND}"),
                otel.kind = "client",
                http.request.method = "POST",
                url.path = MESSAGE_SEND,
                server.address = %self.base_url,
            ))
            .await;
            meters::provider_call(&job.channel, started.elapsed());
            let answer = match answer {
                Ok(Ok(answer)) => answer,
                Ok(Err(status)) => {
                    meters::provider_answer("wecom", "transport");
                    return Attempt::Retry {
                        code: "transport".into(),
                        message: format!("wecom answered HTTP {status}"),
                        provider_down: true,
                    };
                }
                Err(e) => {
                    meters::provider_answer("wecom", "transport");
                    return Attempt::Retry {
                        code: "transport".into(),
                        message: e.without_url().to_string(),
                        provider_down: true,
                    };
                }
            };
            tracing::Span::current().record("herald.provider.errcode", answer.errcode);
            let code = answer.errcode.to_string();
            meters::provider_answer("wecom", &code);
            return match classify(answer.errcode) {
                Action::Sent
                    if answer
                        .invaliduser
                        .split('|')
                        .any(|user| user == job.recipient) =>
                {
                    Attempt::Failed {
                        code: "invaliduser".into(),
                        message: "WeCom refused this member (not in the app's visible range)"
                            .into(),
                        kind: FailureKind::Recipient,
                        alert: None,
                    }
                }
                Action::Sent if answer.msgid.is_empty() => Attempt::Retry {
                    code: "no_msgid".into(),
                    message: "success answer without msgid".into(),
                    provider_down: false,
                },
                Action::Sent => Attempt::Sent(answer.msgid),
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
                Action::RefreshToken => Attempt::Retry {
                    code,
                    message: answer.errmsg,
                    provider_down: false,
                },
                Action::Retry { provider_down } => Attempt::Retry {
                    code,
                    message: answer.errmsg,
                    provider_down,
                },
                Action::Defer(wait) => Attempt::Defer {
                    code,
                    message: answer.errmsg,
                    defer: Defer::For(wait),
                    alert: None,
                },
                Action::Permanent(kind) => Attempt::failed(code, answer.errmsg, kind),
            };
        }
    }
}

impl Channel for Wecom {
    fn name(&self) -> &'static str {
        herald_contract::channels::WECOM
    }

    fn provider(&self) -> &'static str {
        "wecom"
    }

    fn narrower_limits(&self, job: &DeliveryJob) -> Vec<NarrowerLimit> {
        let limit = self
            .member_limits
            .get(&job.provider_account)
            .copied()
            .unwrap_or(MEMBER_RATE_LIMIT);
        vec![NarrowerLimit {
            scope: "member",
            id: job.recipient.clone(),
            limit,
        }]
    }

    fn send<'a>(
        &'a self,
        job: &'a DeliveryJob,
        _delivery_id: Uuid,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(self.attempt(job))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_follows_the_provider_facts() {
        assert_eq!(classify(0), Action::Sent);
        assert_eq!(
            classify(-1),
            Action::Retry {
                provider_down: true
            }
        );
        assert_eq!(classify(42001), Action::RefreshToken);
        assert_eq!(classify(81013), Action::Permanent(FailureKind::Recipient));
        assert_eq!(classify(40056), Action::Permanent(FailureKind::Config));
        assert_eq!(classify(45009), Action::Defer(Duration::from_secs(60)));
        assert_eq!(classify(99999), Action::Permanent(FailureKind::Unknown));
    }
}
