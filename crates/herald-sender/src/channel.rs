//! The channel model: a channel is one module behind [`Channel`] (built from configuration,
//! sends a rendered payload, classifies the provider's answer into an [`Attempt`]), the way
//! Vector's sinks are built. The worker around it (lanes, rate limits, breaker, claim, outcome,
//! retries) is the same for every channel, so adding one touches no other.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use herald_contract::v1::DeliveryJob;
use uuid::Uuid;

/// A channel: `wechat.template`, `wechat.subscribe`, `wecom.app`, ...
pub trait Channel: Send + Sync {
    /// The channel's name, also its routing key and queue name part.
    fn name(&self) -> &'static str;
    /// The provider, for metrics and breaker labels (`wechat`, `wecom`, ...).
    fn provider(&self) -> &'static str;
    /// The provider's own per-account limit, used when configuration sets none.
    fn default_rate_limit(&self) -> Option<crate::limit::RateLimit> {
        None
    }
    /// Limits the provider enforces on something narrower than the account (a WeCom member,
    /// an e-mail domain, a webhook endpoint), each reserved beside the account's own.
    fn narrower_limits(&self, _job: &DeliveryJob) -> Vec<NarrowerLimit> {
        Vec::new()
    }
    /// One delivery attempt: the provider call (plus whatever immediate re-try the protocol
    /// calls for, like a fresh token), classified.
    fn send<'a>(
        &'a self,
        job: &'a DeliveryJob,
        delivery_id: Uuid,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>>;
}

/// A limit within a provider account: `scope` names what it counts (`member`, `domain`,
/// `endpoint`), `id` which one.
#[derive(Debug, Clone, PartialEq)]
pub struct NarrowerLimit {
    pub scope: &'static str,
    pub id: String,
    pub limit: crate::limit::RateLimit,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Accepted by the provider, with its message id.
    Sent(String),
    /// Transient: retry from the next tier of the channel's schedule (counts as an attempt).
    Retry {
        code: String,
        message: String,
        /// The provider itself failed (unreachable, 5xx, busy): counts toward its breaker.
        provider_down: bool,
    },
    /// A quota or an account block: wait, in state `deferred`, without using up an attempt.
    Defer {
        code: String,
        message: String,
        defer: Defer,
        alert: Option<AlertKind>,
    },
    /// Will never succeed as sent.
    Failed {
        code: String,
        message: String,
        kind: FailureKind,
        alert: Option<AlertKind>,
    },
}

impl Attempt {
    /// A permanent failure; anything but the recipient's own needs an operator (an alert of
    /// its kind).
    pub fn failed(code: impl Into<String>, message: impl Into<String>, kind: FailureKind) -> Self {
        Attempt::Failed {
            code: code.into(),
            message: message.into(),
            kind,
            alert: kind.alert(),
        }
    }
}

impl FailureKind {
    /// The alert a failure of this kind raises.
    pub fn alert(self) -> Option<AlertKind> {
        match self {
            FailureKind::Recipient => None,
            FailureKind::Template => Some(AlertKind::Template),
            FailureKind::Config => Some(AlertKind::Config),
            FailureKind::Unknown => Some(AlertKind::UnknownCode),
        }
    }
}

/// How long a deferred job waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defer {
    /// Until the channel's configured daily quota reset (WeChat: midnight in Beijing).
    QuotaReset,
    /// This long.
    For(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// This recipient cannot get it (bad address, not following, refused).
    Recipient,
    /// The template (id or arguments) is wrong: fix the template.
    Template,
    /// The account is misconfigured (appid, secret, permissions): alert.
    Config,
    /// The provider answered a code the channel's table does not know.
    Unknown,
}

/// What an operator is alerted about (`herald_sender_alerts_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    Config,
    Template,
    /// The daily quota is used up: sends wait for the reset.
    Quota,
    /// The provider blocks the server's IP until an admin confirms it (WeChat 89503).
    IpBlocked,
    UnknownCode,
}

impl AlertKind {
    pub fn label(self) -> &'static str {
        match self {
            AlertKind::Config => "config",
            AlertKind::Template => "template",
            AlertKind::Quota => "quota",
            AlertKind::IpBlocked => "ip_blocked",
            AlertKind::UnknownCode => "unknown_code",
        }
    }
}

/// The attempt for a token-service failure: permanent ones (the provider refuses the account's
/// credentials) need an operator; the rest retry. Neither says anything about the provider.
pub fn token_failure(error: herald_token::client::TokenClientError) -> Attempt {
    if error.is_permanent() {
        Attempt::Failed {
            code: "token".into(),
            message: error.to_string(),
            kind: FailureKind::Config,
            alert: Some(AlertKind::Config),
        }
    } else {
        Attempt::Retry {
            code: "token".into(),
            message: error.to_string(),
            provider_down: false,
        }
    }
}
