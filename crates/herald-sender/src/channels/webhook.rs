//! `webhook`: the rendered `webhook` variant (a JSON body) POSTed to the recipient's
//! `webhook_url`, signed with the Standard Webhooks scheme (`herald-webhook`).
//!
//! - `webhook-id` is `msg_` + the delivery id's 32 hex digits: the same for every attempt of a
//!   delivery, so receivers de-duplicate retries with it; it is also the provider msgid.
//! - `webhook-signature` carries one `v1,` signature per secret of the provider account
//!   (`[sender.webhooks.<account>] secrets`), so secrets rotate without a gap.
//! - The target must be public: the client's resolver refuses private, loopback, link-local,
//!   CGNAT, multicast and unspecified addresses (and their v6 forms) at connect time unless
//!   the account's `allow` lists the block; redirects are not followed; at most 64 KiB of an
//!   answer is read.
//!
//! Answers: 2xx sent; 408, 429 retry; 5xx, timeouts and connection errors retry and count
//! toward the account's breaker; 410 Gone fails the recipient for good; 3xx (a redirect, not
//! followed) and other 4xx fail the recipient; a refused target fails with `ssrf_refused`.
//!
//! The payload travels as a protobuf `Struct`, whose numbers are doubles: whole numbers are
//! sent as integers again (`2`, not `2.0`), so the receiver sees what the template says.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use herald_contract::v1::DeliveryJob;
use herald_webhook::target::{self, Allow};
use herald_webhook::{Secret, TargetError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::channel::{Attempt, Channel, FailureKind, NarrowerLimit};
use crate::limit::RateLimit;
use crate::meters;

/// At most this much of an answer is read (for the error text); the rest is dropped.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How much of an error answer's body goes into the delivery's error text.
const ANSWER_EXCERPT_CHARS: usize = 200;
const PROVIDER: &str = "webhook";

/// `[sender.webhooks."<account>"]`: a provider account of the `webhook` channel (typically one
/// per tenant). Secrets come from the environment or a secret store in production
/// (`HERALD_SENDER__WEBHOOKS__<ID>__SECRETS`, space-separated) and are never logged.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookAccountSettings {
    /// `whsec_<base64>` signing secrets; each request is signed with every one of them
    /// (two while rotating: receivers accept either). A list, or one space-separated string
    /// (as environment variables give it).
    #[serde(deserialize_with = "list_or_words")]
    pub secrets: Vec<String>,
    /// CIDR blocks (`127.0.0.1/32`), addresses or host names that may be private: internal
    /// receivers the operator trusts. Everything else must be a public address.
    pub allow: Vec<String>,
    /// What one endpoint (scheme, host and port of its URL) may receive, so one tenant's
    /// slow receiver is not flooded by a burst meant for many (none by default: the
    /// account's own limit still holds).
    pub endpoint_rate_limit: Option<RateLimit>,
}

/// A list of strings, or one string of space-separated words.
fn list_or_words<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        List(Vec<String>),
        Words(String),
    }
    Ok(match Given::deserialize(d)? {
        Given::List(list) => list,
        Given::Words(words) => words.split_whitespace().map(String::from).collect(),
    })
}

impl std::fmt::Debug for WebhookAccountSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookAccountSettings")
            .field("secrets", &format_args!("[*** x{}]", self.secrets.len()))
            .field("allow", &self.allow)
            .field("endpoint_rate_limit", &self.endpoint_rate_limit)
            .finish()
    }
}

/// What an HTTP answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Transient; `provider_down` when the receiver itself is failing (5xx).
    Retry {
        provider_down: bool,
    },
    Permanent(FailureKind),
}

/// The answer table (module docs).
pub fn classify(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Sent,
        // Request timeout, too many requests: the receiver is up but not now.
        408 | 429 => Outcome::Retry {
            provider_down: false,
        },
        500..=599 => Outcome::Retry {
            provider_down: true,
        },
        // 410 Gone: the endpoint says it is removed for good; other 4xx: it refuses this
        // request as it is; 3xx: a redirect, which Herald does not follow.
        300..=499 => Outcome::Permanent(FailureKind::Recipient),
        _ => Outcome::Permanent(FailureKind::Unknown),
    }
}

/// The `webhook-id` of a delivery: the same for every attempt.
pub fn webhook_id(delivery_id: Uuid) -> String {
    format!("msg_{}", delivery_id.simple())
}

/// Numbers that went through a protobuf `Struct` are doubles: a whole one (within the doubles'
/// exact integer range) becomes an integer again.
pub fn restore_integers(value: &mut Value) {
    /// 2^53: above it a double no longer holds every integer, so it stays as it is.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(number) => {
            if let Some(float) = number.as_f64()
                && !number.is_i64()
                && !number.is_u64()
                && float.fract() == 0.0
                && float.abs() <= EXACT
            {
                // Exact: a whole double of at most 2^53 fits an i64.
                *value = Value::from(float as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(restore_integers),
        Value::Object(fields) => fields.values_mut().for_each(restore_integers),
        _ => {}
    }
}

/// One provider account, ready to send.
struct Account {
    secrets: Vec<Secret>,
    allow: Arc<Allow>,
    /// The account's own client: its resolver knows the account's allow-list.
    http: reqwest::Client,
    endpoint_rate_limit: Option<RateLimit>,
}

/// The `webhook` channel.
pub struct Webhooks {
    accounts: BTreeMap<String, Account>,
}

impl Webhooks {
    /// Parses every account's secrets and allow-list: a bad one stops the sender at start.
    pub fn new(settings: &crate::SenderSettings) -> Result<Self, String> {
        let mut accounts = BTreeMap::new();
        for (id, account) in &settings.webhooks {
            let secrets = account
                .secrets
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Secret::parse(s).map_err(|e| format!("sender.webhooks.{id}.secrets[{i}]: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let allow = Arc::new(
                Allow::parse(&account.allow)
                    .map_err(|e| format!("sender.webhooks.{id}.allow: {e}"))?,
            );
            let http = target::client(
                allow.clone(),
                reqwest::Client::builder()
                    .timeout(Duration::from_millis(settings.request_timeout_ms))
                    .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
                    .pool_idle_timeout(Duration::from_secs(90))
                    .user_agent(concat!("Herald-Webhooks/", env!("CARGO_PKG_VERSION"))),
            )
            .map_err(|e| format!("sender.webhooks.{id}: HTTP client: {e}"))?;
            accounts.insert(
                id.clone(),
                Account {
                    secrets,
                    allow,
                    http,
                    endpoint_rate_limit: account.endpoint_rate_limit,
                },
            );
        }
        Ok(Self { accounts })
    }

    async fn attempt(&self, job: &DeliveryJob, delivery_id: Uuid) -> Attempt {
        let account_id = job.provider_account.as_str();
        let Some(account) = self
            .accounts
            .get(account_id)
            .filter(|a| !a.secrets.is_empty())
        else {
            return Attempt::failed(
                "config",
                format!("no [sender.webhooks.{account_id}] secrets configured"),
                FailureKind::Config,
            );
        };
        let shown = target::masked(&job.recipient);
        let url = match target::check_url(&job.recipient, &account.allow) {
            Ok(url) => url,
            Err(TargetError::InvalidUrl(why)) => {
                return Attempt::failed(
                    "invalid_url",
                    format!("webhook_url: {why}"),
                    FailureKind::Recipient,
                );
            }
            Err(TargetError::Refused(refused)) => return ssrf_refused(&refused),
        };
        let mut body = job
            .payload
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or_else(|| Value::Object(Default::default()));
        restore_integers(&mut body);
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let id = webhook_id(delivery_id);
        let timestamp = chrono::Utc::now().timestamp();
        let mut request = account
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                herald_webhook::signature_header(&account.secrets, &id, timestamp, &body),
            )
            .body(body);
        for (name, value) in herald_telemetry::trace_headers() {
            request = request.header(name, value);
        }
        let started = std::time::Instant::now();
        let answer = async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            // The answer's body only explains a refusal; a bounded read also returns the
            // connection to the pool.
            let text = target::read_bounded(response, MAX_ANSWER_BYTES)
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            Ok::<_, reqwest::Error>((status, text))
        }
        .instrument(tracing::info_span!(
            "POST",
            otel.name = "POST webhook",
            otel.kind = "client",
            http.request.method = "POST",
            server.address = %shown,
        ))
        .await;
        meters::provider_call(&job.channel, started.elapsed());
        let (status, text) = match answer {
            Ok(answer) => answer,
            Err(error) => {
                if let Some(refused) = target::refusal(&error) {
                    return ssrf_refused(&refused);
                }
                let code = if error.is_timeout() {
                    "timeout"
                } else {
                    "transport"
                };
                meters::provider_answer(PROVIDER, code);
                return Attempt::Retry {
                    code: code.into(),
                    message: format!("{shown}: {}", target::describe(error)),
                    provider_down: true,
                };
            }
        };
        let code = format!("http_{status}");
        meters::provider_answer(PROVIDER, &code);
        let excerpt: String = text.trim().chars().take(ANSWER_EXCERPT_CHARS).collect();
        let message = if excerpt.is_empty() {
            format!("{shown} answered HTTP {status}")
        } else {
            format!("{shown} answered HTTP {status}: {excerpt}")
        };
        match classify(status) {
            Outcome::Sent => Attempt::Sent(id),
            Outcome::Retry { provider_down } => Attempt::Retry {
                code,
                message,
                provider_down,
            },
            Outcome::Permanent(kind) => {
                tracing::info!(%shown, status, "webhook refused by its receiver");
                Attempt::failed(code, message, kind)
            }
        }
    }
}

/// A target the guard refused: the recipient's address is at fault, and no retry changes it.
fn ssrf_refused(refused: &herald_webhook::Refused) -> Attempt {
    meters::provider_answer(PROVIDER, "ssrf_refused");
    tracing::warn!(host = %refused.host, address = %refused.address, "webhook target refused (SSRF guard)");
    Attempt::failed(
        "ssrf_refused",
        format!("refused target: {refused}; allow-list it in [sender.webhooks] allow"),
        FailureKind::Recipient,
    )
}

impl Channel for Webhooks {
    fn name(&self) -> &'static str {
        herald_contract::channels::WEBHOOK
    }

    fn provider(&self) -> &'static str {
        PROVIDER
    }

    /// Per provider account (a tenant's webhook account): 10 requests a second, bursts of 10,
    /// shared by all its endpoints. Override with `[sender.accounts.<id>] rate_limit`.
    fn default_rate_limit(&self) -> Option<RateLimit> {
        Some(RateLimit {
            per_second: 10.0,
            burst: 10,
        })
    }

    fn narrower_limits(&self, job: &DeliveryJob) -> Vec<NarrowerLimit> {
        let limit = self
            .accounts
            .get(&job.provider_account)
            .and_then(|account| account.endpoint_rate_limit);
        let endpoint = reqwest::Url::parse(&job.recipient)
            .ok()
            .map(|url| url.origin().ascii_serialization());
        match (limit, endpoint) {
            (Some(limit), Some(endpoint)) => vec![NarrowerLimit {
                scope: "endpoint",
                id: endpoint,
                limit,
            }],
            // An unparsable URL fails in the send, with its reason.
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answer_table() {
        assert_eq!(classify(200), Outcome::Sent);
        assert_eq!(classify(204), Outcome::Sent);
        for status in [408, 429] {
            assert_eq!(
                classify(status),
                Outcome::Retry {
                    provider_down: false
                }
            );
        }
        for status in [500, 502, 503, 504] {
            assert_eq!(
                classify(status),
                Outcome::Retry {
                    provider_down: true
                }
            );
        }
        for status in [301, 302, 307, 400, 401, 403, 404, 410, 422] {
            assert_eq!(
                classify(status),
                Outcome::Permanent(FailureKind::Recipient),
                "{status}"
            );
        }
        assert_eq!(classify(101), Outcome::Permanent(FailureKind::Unknown));
    }

    #[test]
    fn whole_numbers_become_integers_again() {
        let mut body = json!({
            "count": 2.0,
            "price": 2.5,
            "negative": -3.0,
            "big": 2432232314.0,
            "huge": 1e300,
            "list": [1.0, {"n": 0.0}],
            "text": "2.0",
        });
        restore_integers(&mut body);
        assert_eq!(
            serde_json::to_string(&body).expect("json"),
            r#"{"big":2432232314,"count":2,"huge":1e+300,"list":[1,{"n":0}],"negative":-3,"price":2.5,"text":"2.0"}"#
        );
    }

    #[test]
    fn ids_are_per_delivery() {
        let delivery = Uuid::parse_str("0195f7e0-4c1a-7b2e-9d3f-a1b2c3d4e5f6").expect("uuid");
        assert_eq!(webhook_id(delivery), "msg_0195f7e04c1a7b2e9d3fa1b2c3d4e5f6");
    }

    #[test]
    fn settings_never_show_their_secrets() {
        let account = WebhookAccountSettings {
            secrets: vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
            allow: vec!["127.0.0.1/32".into()],
            ..Default::default()
        };
        let shown = format!("{account:?}");
        assert!(
            !shown.contains("MfKQ") && shown.contains("127.0.0.1/32"),
            "{shown}"
        );
    }

    #[test]
    fn secrets_are_a_list_or_one_string_of_words() {
        let listed: WebhookAccountSettings =
            serde_json::from_value(json!({"secrets": ["whsec_a", "whsec_b"]})).expect("list");
        let words: WebhookAccountSettings =
            serde_json::from_value(json!({"secrets": "whsec_a  whsec_b"})).expect("words");
        assert_eq!(listed.secrets, ["whsec_a", "whsec_b"]);
        assert_eq!(words, listed);
    }

    #[test]
    fn bad_secrets_and_blocks_stop_the_sender() {
        let mut settings = crate::SenderSettings::default();
        settings.webhooks.insert(
            "t-webhook".into(),
            WebhookAccountSettings {
                secrets: vec!["whsec_!!".into()],
                ..Default::default()
            },
        );
        let error = Webhooks::new(&settings).err().expect("refused");
        assert!(
            error.contains("sender.webhooks.t-webhook.secrets[0]"),
            "{error}"
        );
        settings.webhooks.insert(
            "t-webhook".into(),
            WebhookAccountSettings {
                allow: vec!["10.0.0.0/40".into()],
                ..Default::default()
            },
        );
        let error = Webhooks::new(&settings).err().expect("refused");
        assert!(error.contains("sender.webhooks.t-webhook.allow"), "{error}");
    }

    #[test]
    fn an_endpoint_is_the_urls_origin() {
        let mut settings = crate::SenderSettings::default();
        let limit = RateLimit {
            per_second: 2.0,
            burst: 5,
        };
        settings.webhooks.insert(
            "limited".into(),
            WebhookAccountSettings {
                secrets: vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
                endpoint_rate_limit: Some(limit),
                ..Default::default()
            },
        );
        settings.webhooks.insert(
            "open".into(),
            WebhookAccountSettings {
                secrets: vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
                ..Default::default()
            },
        );
        let webhooks = Webhooks::new(&settings).expect("valid");
        let job = |account: &str, url: &str| DeliveryJob {
            provider_account: account.into(),
            recipient: url.into(),
            ..Default::default()
        };
        let limits =
            webhooks.narrower_limits(&job("limited", "https://Hooks.Example.com:8443/a/b?c=d"));
        assert_eq!(
            limits,
            [NarrowerLimit {
                scope: "endpoint",
                id: "https://hooks.example.com:8443".into(),
                limit,
            }]
        );
        assert!(
            webhooks
                .narrower_limits(&job("open", "https://hooks.example.com/"))
                .is_empty()
        );
        assert!(
            webhooks
                .narrower_limits(&job("limited", "not a url"))
                .is_empty()
        );
    }
}
