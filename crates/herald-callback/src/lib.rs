//! The callback receiver, the status projector and the status webhook dispatcher.
//!
//! The receiver verifies a provider callback before reading it, normalises it into events
//! (`DeliveryEvent`s about messages, `RecipientEvent`s about recipients), publishes those with
//! confirms and only then answers `success`. The projector consumes them and applies them to
//! the delivery state machine and the recipient directory. The dispatcher POSTs each tenant's
//! status events to its webhook, signed with the Standard Webhooks scheme.

pub mod crypto;
mod projector;
mod receiver;
pub mod sms;
pub mod webhooks;
pub mod wechat;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use herald_amqp::{AmqpSettings, Broker};
use herald_store::{Store, StoreSettings};
use herald_telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use projector::{run_pending_sweep, run_projector};
pub use webhooks::WebhookSettings;

/// AMQP header that tells the projector what an event body is; absent means `DeliveryEvent`.
pub const EVENT_TYPE_HEADER: &str = "x-herald-event";
/// [`EVENT_TYPE_HEADER`] of a `RecipientEvent`.
pub const RECIPIENT_EVENT: &str = "recipient";

/// One WeChat account's server configuration.
#[derive(Clone, Serialize, Deserialize)]
pub struct WechatCallbackAccount {
    /// The "Token" configured in WeChat's server configuration.
    pub token: String,
    pub appid: String,
    /// The console's EncodingAESKey (43 characters): needed for compatible and safe mode.
    /// Without it only plain mode is accepted.
    #[serde(default)]
    pub encoding_aes_key: Option<String>,
}

impl std::fmt::Debug for WechatCallbackAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WechatCallbackAccount")
            .field("appid", &self.appid)
            .field("token", &"***")
            .field(
                "encoding_aes_key",
                &self.encoding_aes_key.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// One WeCom application's callback configuration (always encrypted).
#[derive(Clone, Serialize, Deserialize)]
pub struct WecomCallbackAccount {
    pub token: String,
    pub corpid: String,
    pub encoding_aes_key: String,
}

impl std::fmt::Debug for WecomCallbackAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WecomCallbackAccount")
            .field("corpid", &self.corpid)
            .field("token", &"***")
            .field("encoding_aes_key", &"***")
            .finish()
    }
}

/// One SMS provider account's receipts (`[callback.sms."<account>"]`). Neither Tencent Cloud
/// nor Aliyun signs its receipt pushes: the URL registered in the provider's console carries
/// this secret (`https://herald.example/v1/callbacks/sms/<account>?token=<token>`), or the
/// push authenticates with it as the HTTP Basic password.
#[derive(Clone, Serialize, Deserialize)]
pub struct SmsCallbackAccount {
    /// `tencent_sms` or `aliyun_sms`: the receipt format.
    pub provider: sms::SmsReceiptProvider,
    /// At least 16 characters; from the environment in production
    /// (`HERALD_CALLBACK__SMS__<ID>__TOKEN`).
    pub token: String,
}

impl std::fmt::Debug for SmsCallbackAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsCallbackAccount")
            .field("provider", &self.provider)
            .field("token", &"***")
            .finish()
    }
}

/// `[callback]` in herald.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CallbackSettings {
    pub listen: String,
    pub max_body_bytes: usize,
    /// Callbacks whose timestamp is further than this from now are rejected (replays).
    pub timestamp_window_secs: i64,
    /// How long the receiver waits for the broker to confirm a callback's events before it
    /// answers 503 (the provider retries). WeChat gives up after 5 s in all.
    pub publish_timeout_ms: u64,
    /// An event that arrived before its send result waits at most this long for it; then it is
    /// parked in the dead-letter queue as `unmatched_event`.
    pub pending_max_age_secs: u64,
    /// How often the projector looks for such events.
    pub pending_sweep_interval_ms: u64,
    /// WeChat accounts by provider-account id (the id in the callback URL).
    pub wechat: BTreeMap<String, WechatCallbackAccount>,
    /// WeCom applications by provider-account id (the id in the callback URL).
    pub wecom: BTreeMap<String, WecomCallbackAccount>,
    /// SMS provider accounts' delivery receipts, by provider-account id (the id in the URL).
    pub sms: BTreeMap<String, SmsCallbackAccount>,
    pub webhooks: WebhookSettings,
}

impl Default for CallbackSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8094".into(),
            max_body_bytes: 64 * 1024,
            timestamp_window_secs: 300,
            publish_timeout_ms: 4000,
            pending_max_age_secs: 6 * 3600,
            pending_sweep_interval_ms: 60_000,
            // None by default (a map default would merge into every deployment's
            // configuration); `heraldctl up` adds the demo account.
            wechat: BTreeMap::new(),
            wecom: BTreeMap::new(),
            sms: BTreeMap::new(),
            webhooks: WebhookSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CallbackConfig {
    pub amqp: AmqpSettings,
    pub postgres: StoreSettings,
    pub telemetry: TelemetrySettings,
    pub callback: CallbackSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error(transparent)]
    Amqp(#[from] herald_amqp::AmqpError),
    #[error(transparent)]
    Store(#[from] herald_store::StoreError),
    #[error("callback listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
}

/// Runs the receiver on `listener`, the projector, the pending-event sweep and the webhook
/// dispatcher until `shutdown` (or until any of them ends, which stops the others).
pub async fn run(
    config: CallbackConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), CallbackError> {
    let settings = config.callback.clone();
    let broker = Broker::connect(&config.amqp, "callback").await?;
    broker.declare_topology().await?;
    let stop = shutdown.child_token();
    let (store, relay) = Store::open(&config.postgres, &broker, stop.clone()).await?;
    herald_telemetry::spawn_admin(&config.telemetry, store.ready_check(&broker), stop.clone())
        .await?;
    // The receiver reads the database only to continue traces, on a pool of its own: the
    // projector's transactions must never delay an answer WeChat waits 5 s for.
    let receiver_store =
        Store::connect(&config.postgres, &broker.topology().status_exchange()).await?;
    let receiver = Arc::new(receiver::Receiver::new(
        broker.clone(),
        receiver_store,
        settings.clone(),
    )?);
    let dispatcher = webhooks::Dispatcher::new(&settings.webhooks)?;

    let projector = tokio::spawn({
        let (broker, store, stop) = (broker.clone(), store.clone(), stop.clone());
        let prefetch = config.amqp.prefetch;
        async move {
            let ended = run_projector(broker, store, prefetch, stop.clone()).await;
            stop.cancel();
            ended
        }
    });
    let sweep = tokio::spawn(run_pending_sweep(
        store.clone(),
        broker.topology().dead_letter_exchange(),
        broker.topology().projector_queue(),
        Duration::from_secs(settings.pending_max_age_secs),
        Duration::from_millis(settings.pending_sweep_interval_ms),
        stop.clone(),
    ));
    let webhook_task = tokio::spawn({
        let (broker, store, stop) = (broker.clone(), store.clone(), stop.clone());
        let prefetch = config.amqp.prefetch;
        async move {
            let ended = dispatcher.run(broker, store, prefetch, stop.clone()).await;
            stop.cancel();
            ended
        }
    });

    tracing::info!(address = %listener.local_addr()?, "callback receiver listening");
    let server = axum::serve(listener, router(receiver))
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await;
    stop.cancel();
    let projected = projector.await;
    let dispatched = webhook_task.await;
    let _ = sweep.await;
    let _ = relay.await;
    broker.close().await;
    server?;
    for ended in [projected, dispatched] {
        match ended {
            Ok(result) => result?,
            Err(join) => return Err(CallbackError::Io(std::io::Error::other(join.to_string()))),
        }
    }
    Ok(())
}

fn router(receiver: Arc<receiver::Receiver>) -> Router {
    let limit = receiver.settings.max_body_bytes;
    Router::new()
        .route(
            "/v1/callbacks/wechat/{account}",
            get(receiver::wechat_verify).post(receiver::wechat_event),
        )
        .route(
            "/v1/callbacks/wecom/{account}",
            get(receiver::wecom_verify).post(receiver::wecom_event),
        )
        .route(
            "/v1/callbacks/sms/{account}",
            axum::routing::post(receiver::sms_receipt),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(receiver)
}

async fn ready(State(receiver): State<Arc<receiver::Receiver>>) -> Response {
    let db = receiver.store.ping().await.is_ok();
    let broker = receiver.broker.is_connected();
    let status = if db && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({ "postgres": db, "rabbitmq": broker })),
    )
        .into_response()
}
