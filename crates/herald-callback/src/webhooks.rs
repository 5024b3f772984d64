//! Per-tenant status webhooks, signed with the Standard Webhooks scheme.
//!
//! The dispatcher consumes its own queue (`<prefix>.webhooks`, bound to the status exchange
//! with `status.#`), looks up the event's tenant's webhook and POSTs
//! `{"type": "delivery.<state>", "timestamp": …, "data": <StatusEvent>}` with
//!
//! - `webhook-id`: `msg_` + the first 32 hex digits of SHA-256 of the status event, so the
//!   same event (retried, or published twice by the outbox) always has the same id;
//! - `webhook-timestamp`: unix seconds of this attempt;
//! - `webhook-signature`: `v1,` + base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>")), the key
//!   being the base64 part of the tenant's `whsec_…` secret.
//!
//! Any answer but 2xx, and any transport error, is retried with exponential backoff (backon);
//! after `max_attempts` the event is parked in the dead-letter queue (`webhook_failed`).
//! Targets that resolve to private, loopback or link-local addresses are refused unless their
//! host is allow-listed (SSRF), and redirects are not followed.
//!
//! Signing, secrets and the SSRF guard are `herald-webhook`'s, shared with the sender's
//! `webhook` channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use herald_amqp::{Broker, Delivery, Disposition};
use herald_contract::decode_json;
use herald_contract::v1::StatusEvent;
use herald_store::{Store, TenantWebhook};
use herald_webhook::target::{self, Allow};
use herald_webhook::{Secret, TargetError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::CallbackError;

/// `[callback.webhooks]` in herald.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookSettings {
    /// Per attempt: connect, send and answer.
    pub timeout_ms: u64,
    /// Attempts in all before the event is parked.
    pub max_attempts: usize,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Hosts (names or IP addresses, as in the URL) or CIDR blocks (`10.0.0.0/8`) allowed to
    /// be private, loopback or link-local: internal receivers an operator trusts. Everything
    /// else must be public.
    pub allow_private_hosts: Vec<String>,
    /// How long a tenant's webhook settings are reused before they are read again.
    pub settings_cache_ms: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            max_attempts: 8,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 120_000,
            allow_private_hosts: Vec::new(),
            settings_cache_ms: 2_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    InvalidSecret(#[from] herald_webhook::SecretError),
    #[error("refused target: {0}")]
    Refused(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("transport: {0}")]
    Transport(String),
}

impl WebhookError {
    fn retryable(&self) -> bool {
        matches!(self, WebhookError::Status(_) | WebhookError::Transport(_))
    }
}

/// The `webhook-id` of a status event: stable across retries and duplicate publishes.
pub fn message_id(status_event_body: &[u8]) -> String {
    let digest = hex::encode(Sha256::digest(status_event_body));
    format!("msg_{}", &digest[..32])
}

/// A tenant's webhook as last read, and when.
type CachedWebhook = (tokio::time::Instant, Option<TenantWebhook>);

/// POSTs status events to tenants' webhooks.
pub struct Dispatcher {
    settings: WebhookSettings,
    allow: Arc<Allow>,
    http: reqwest::Client,
    /// Every status event needs its tenant's webhook; most tenants have none, and a burst of
    /// events should not be a burst of identical queries.
    cache: Mutex<HashMap<String, CachedWebhook>>,
}

impl Dispatcher {
    pub fn new(settings: &WebhookSettings) -> Result<Self, CallbackError> {
        let allow = Arc::new(Allow::parse(&settings.allow_private_hosts).map_err(|e| {
            CallbackError::Config(format!("callback.webhooks.allow_private_hosts: {e}"))
        })?);
        let http = target::client(
            allow.clone(),
            reqwest::Client::builder().timeout(Duration::from_millis(settings.timeout_ms)),
        )
        .map_err(|e| CallbackError::Config(format!("webhook HTTP client: {e}")))?;
        Ok(Self {
            settings: settings.clone(),
            allow,
            http,
            cache: Mutex::new(HashMap::new()),
        })
    }

    async fn webhook(
        &self,
        store: &Store,
        tenant: &str,
    ) -> Result<Option<TenantWebhook>, herald_store::StoreError> {
        let now = tokio::time::Instant::now();
        let ttl = Duration::from_millis(self.settings.settings_cache_ms);
        if let Some((at, cached)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            && now.duration_since(*at) < ttl
        {
            return Ok(cached.clone());
        }
        let webhook = store.tenant_webhook(tenant).await?;
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant.to_string(), (now, webhook.clone()));
        Ok(webhook)
    }

    /// Consumes `<prefix>.webhooks` until `shutdown`.
    pub async fn run(
        self,
        broker: Broker,
        store: Store,
        prefetch: u16,
        shutdown: CancellationToken,
    ) -> Result<(), herald_amqp::AmqpError> {
        let queue = broker.topology().webhook_queue();
        let consumer = broker.consume(&queue, "herald-webhooks").await?;
        tracing::info!(%queue, "status webhook dispatcher consuming");
        let dispatcher = Arc::new(self);
        let stop = shutdown.clone();
        consumer
            .run(
                broker.clone(),
                usize::from(prefetch),
                shutdown,
                move |delivery| {
                    let (dispatcher, store, stop) =
                        (dispatcher.clone(), store.clone(), stop.clone());
                    async move {
                        tokio::select! {
                            disposition = dispatcher.handle(&store, &delivery) => disposition,
                            // Waiting out a backoff must not hold up shutdown; the event
                            // goes back to the queue.
                            _ = stop.cancelled() => Disposition::Requeue {
                                error: "shutting down".into(),
                            },
                        }
                    }
                },
            )
            .await
    }

    async fn handle(&self, store: &Store, delivery: &Delivery) -> Disposition {
        let event: StatusEvent = match decode_json(&delivery.data) {
            Ok(event) => event,
            Err(e) => {
                return Disposition::DeadLetter {
                    reason: "decode_error",
                    detail: e.to_string(),
                };
            }
        };
        let webhook = match self.webhook(store, &event.tenant).await {
            Ok(Some(webhook)) if webhook.enabled => webhook,
            Ok(_) => return Disposition::Ack,
            Err(e) => {
                return Disposition::Requeue {
                    error: e.to_string(),
                };
            }
        };
        let id = message_id(&delivery.data);
        let data: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
        let timestamp = data["at"].clone();
        let payload = serde_json::json!({
            "type": format!("delivery.{}", event.state().name()),
            "timestamp": timestamp,
            "data": data,
        });
        let body = serde_json::to_vec(&payload).unwrap_or_default();
        let secret = match Secret::parse(&webhook.secret) {
            Ok(secret) => secret,
            Err(e) => {
                return Disposition::DeadLetter {
                    reason: "webhook_failed",
                    detail: WebhookError::InvalidSecret(e).to_string(),
                };
            }
        };
        let attempt = || self.post_once(&webhook.url, &id, &secret, &body);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.settings.initial_backoff_ms))
            .with_max_delay(Duration::from_millis(self.settings.max_backoff_ms))
            .with_max_times(self.settings.max_attempts.saturating_sub(1))
            .with_jitter();
        let tenant = event.tenant.as_str();
        let sent = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(WebhookError::retryable)
            .notify(|error, wait| {
                tracing::warn!(tenant, webhook_id = %id, %error, ?wait, "status webhook failed; retrying");
            })
            .await;
        match sent {
            Ok(()) => {
                tracing::debug!(tenant, webhook_id = %id, "status webhook delivered");
                Disposition::Ack
            }
            Err(error) => {
                tracing::error!(tenant, webhook_id = %id, %error, "status webhook given up");
                Disposition::DeadLetter {
                    reason: "webhook_failed",
                    detail: format!("{}: {error}", target::masked(&webhook.url)),
                }
            }
        }
    }

    async fn post_once(
        &self,
        url: &str,
        id: &str,
        secret: &Secret,
        body: &[u8],
    ) -> Result<(), WebhookError> {
        // An address literal never reaches the resolver: it is checked here.
        let parsed = target::check_url(url, &self.allow).map_err(|e| match e {
            TargetError::InvalidUrl(text) => WebhookError::Refused(text),
            TargetError::Refused(refused) => WebhookError::Refused(refused.to_string()),
        })?;
        let timestamp = chrono::Utc::now().timestamp();
        let response = self
            .http
            .post(parsed)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", secret.sign(id, timestamp, body))
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| match target::refusal(&e) {
                // The resolver refused every address of the name: not worth a retry.
                Some(refused) => WebhookError::Refused(refused.to_string()),
                None => WebhookError::Transport(target::describe(e)),
            })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(WebhookError::Status(response.status().as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_event() {
        assert_eq!(message_id(b"{}"), message_id(b"{}"));
        assert_ne!(message_id(b"{}"), message_id(b"{ }"));
        assert_eq!(message_id(b"{}").len(), 36);
    }
}
