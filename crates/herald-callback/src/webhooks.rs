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

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use herald_amqp::{Broker, Delivery, Disposition};
use herald_contract::decode_json;
use herald_contract::v1::StatusEvent;
use herald_store::{Store, TenantWebhook};
use hmac::{Hmac, KeyInit, Mac};
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
    /// Hosts (names or IP addresses, as in the URL) allowed to be private, loopback or
    /// link-local: internal receivers an operator trusts. Everything else must be public.
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
    #[error("the secret is not `whsec_` followed by base64")]
    InvalidSecret,
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

/// The HMAC key of a `whsec_<base64>` secret.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, WebhookError> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = BASE64
        .decode(encoded)
        .map_err(|_| WebhookError::InvalidSecret)?;
    if key.is_empty() {
        return Err(WebhookError::InvalidSecret);
    }
    Ok(key)
}

/// `v1,<base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>"))>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// The `webhook-id` of a status event: stable across retries and duplicate publishes.
pub fn message_id(status_event_body: &[u8]) -> String {
    let digest = hex::encode(Sha256::digest(status_event_body));
    format!("msg_{}", &digest[..32])
}

/// Whether an address is on the public internet (std's `is_global` is not stable).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
                || v6 == Ipv6Addr::from([0u16, 0, 0, 0, 0, 0, 0, 1]))
        }
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT 100.64.0.0/10
        || (a == 198 && (18..20).contains(&b)) // benchmarking 198.18.0.0/15
        || a >= 240)
}

/// Resolves names, keeping only public addresses unless the name is allow-listed; the
/// connection goes to exactly what this returns, so a name cannot re-resolve to a private
/// address between the check and the connect.
struct GuardedResolver {
    allow: Arc<HashSet<String>>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let allowed = self.allow.contains(&host);
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found
                .into_iter()
                .filter(|address| allowed || is_public(address.ip()))
                .collect();
            if kept.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A tenant's webhook as last read, and when.
type CachedWebhook = (tokio::time::Instant, Option<TenantWebhook>);

/// POSTs status events to tenants' webhooks.
pub struct Dispatcher {
    settings: WebhookSettings,
    allow: Arc<HashSet<String>>,
    http: reqwest::Client,
    /// Every status event needs its tenant's webhook; most tenants have none, and a burst of
    /// events should not be a burst of identical queries.
    cache: Mutex<HashMap<String, CachedWebhook>>,
}

impl Dispatcher {
    pub fn new(settings: &WebhookSettings) -> Result<Self, CallbackError> {
        let allow: Arc<HashSet<String>> = Arc::new(
            settings
                .allow_private_hosts
                .iter()
                .map(|h| h.trim().trim_matches(['[', ']']).to_ascii_lowercase())
                .collect(),
        );
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve the name itself, around the guard.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                allow: allow.clone(),
            }))
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()
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
        let key = match secret_key(&webhook.secret) {
            Ok(key) => key,
            Err(e) => {
                return Disposition::DeadLetter {
                    reason: "webhook_failed",
                    detail: e.to_string(),
                };
            }
        };
        let attempt = || self.post_once(&webhook.url, &id, &key, &body);
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
                    detail: format!("{}: {error}", redact_url(&webhook.url)),
                }
            }
        }
    }

    async fn post_once(
        &self,
        url: &str,
        id: &str,
        key: &[u8],
        body: &[u8],
    ) -> Result<(), WebhookError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| WebhookError::Refused(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(WebhookError::Refused(format!("scheme {}", parsed.scheme())));
        }
        let host = parsed
            .host_str()
            .ok_or_else(|| WebhookError::Refused("no host".into()))?
            .trim_matches(['[', ']'])
            .to_ascii_lowercase();
        // An address literal never reaches the resolver: check it here.
        if let Ok(ip) = host.parse::<IpAddr>()
            && !is_public(ip)
            && !self.allow.contains(&host)
        {
            return Err(WebhookError::Refused(format!(
                "{host} is not a public address"
            )));
        }
        let timestamp = chrono::Utc::now().timestamp();
        let response = self
            .http
            .post(parsed)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sign(key, id, timestamp, body))
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| {
                // reqwest's Display hides the cause; the resolver's refusal is in the chain.
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    text.push_str(": ");
                    text.push_str(&cause.to_string());
                    source = cause.source();
                }
                WebhookError::Transport(text)
            })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(WebhookError::Status(response.status().as_u16()))
        }
    }
}

/// A URL without its query (which may carry a token) for logs and dead-letter details.
fn redact_url(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_example_signature() {
        // The example of the Standard Webhooks specification.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(secret_key("whsec_!!"), Err(WebhookError::InvalidSecret));
    }

    #[test]
    fn ids_are_stable_per_event() {
        assert_eq!(message_id(b"{}"), message_id(b"{}"));
        assert_ne!(message_id(b"{}"), message_id(b"{ }"));
        assert_eq!(message_id(b"{}").len(), 36);
    }

    #[test]
    fn private_addresses_are_not_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(private.parse().expect("ip")), "{private}");
        }
        for public in ["1.1.1.1", "203.0.114.1", "2606:4700:4700::1111"] {
            assert!(is_public(public.parse().expect("ip")), "{public}");
        }
    }
}
