//! The template renderer: consumes notification requests (from producers over AMQP, or from the
//! ingress outbox), renders every channel variant strictly, writes one delivery row per
//! recipient × channel and publishes the delivery jobs.

mod audience;
mod fanout;
mod preferences;
mod schedule;
pub mod template;

use std::sync::Arc;

use herald_amqp::{AmqpSettings, Broker, Delivery, Disposition};
use herald_contract::v1::{DeliveryJob, FallbackStep, NotificationRequest, Priority};
use herald_contract::{channels, decode_json, headers};
use herald_store::{NewDelivery, NewMessage, Store, StoreSettings};
use herald_telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub use schedule::{MAX_RECIPIENTS, RendererSettings};
pub use template::{CompiledTemplate, RenderError, TemplateCache, TemplateDefinition};

/// The renderer's configuration (sections of herald.toml).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RendererConfig {
    pub amqp: AmqpSettings,
    pub postgres: StoreSettings,
    pub telemetry: TelemetrySettings,
    pub renderer: RendererSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum RendererError {
    #[error("admin listener: {0}")]
    Admin(#[from] std::io::Error),
    #[error(transparent)]
    Amqp(#[from] herald_amqp::AmqpError),
    #[error(transparent)]
    Store(#[from] herald_store::StoreError),
}

/// Namespace for message ids derived from AMQP message ids or bodies.
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6865_7261_6c64_2d6d_7367_2d69_6473_0001);

struct Renderer {
    broker: Broker,
    store: Store,
    templates: Arc<TemplateCache>,
    settings: RendererSettings,
    limits: preferences::Limits,
    /// Recipients being rendered and written at once, over all requests (one permit each):
    /// bounds the renderer's memory whatever the fan-out size of the requests in flight.
    recipients_in_flight: tokio::sync::Semaphore,
}

/// The renderer's two queues. Every request arrives on the render queue; one that is bulk
/// priority or a large fan-out is moved to the bulk lane (one confirmed publish) instead of
/// being rendered there, so requests behind it wait for its move, not for its fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RenderLane {
    Intake,
    Bulk,
}

/// Failures that decide a message's fate.
enum Failure {
    /// Unusable as sent: park it.
    Poison {
        reason: &'static str,
        detail: String,
    },
    /// A well-formed request that cannot be rendered: record the rejection, park it.
    Rejected {
        message_id: Uuid,
        error: RenderError,
    },
    /// Infrastructure trouble: try again.
    Transient(String),
}

impl From<herald_store::StoreError> for Failure {
    fn from(error: herald_store::StoreError) -> Self {
        match error {
            // Another request under a key already used: park it, naming why (REST answers 409).
            herald_store::StoreError::IdempotencyConflict => Failure::Poison {
                reason: "idempotency_conflict",
                detail: "idempotencyKey: already used by another request of this tenant".into(),
            },
            error => Failure::Transient(error.to_string()),
        }
    }
}

impl From<herald_amqp::AmqpError> for Failure {
    fn from(error: herald_amqp::AmqpError) -> Self {
        Failure::Transient(error.to_string())
    }
}

/// Runs the renderer until `shutdown`.
pub async fn run(config: RendererConfig, shutdown: CancellationToken) -> Result<(), RendererError> {
    let broker = Broker::connect(&config.amqp, "renderer").await?;
    broker.declare_topology().await?;
    // Stops the relay too when consuming ends for any reason.
    let stop = shutdown.child_token();
    let (store, relay) = Store::open(&config.postgres, &broker, stop.clone()).await?;
    herald_telemetry::spawn_admin(&config.telemetry, store.ready_check(&broker), stop.clone())
        .await?;
    let mut lanes = Vec::new();
    for (lane, queue, tag, in_flight) in [
        (
            RenderLane::Intake,
            broker.topology().render_queue(),
            "herald-renderer",
            config.renderer.in_flight.max(1),
        ),
        (
            RenderLane::Bulk,
            broker.topology().render_bulk_queue(),
            "herald-renderer-bulk",
            config.renderer.bulk_in_flight.max(1),
        ),
    ] {
        let mut consumer = broker.consume_with_prefetch(&queue, tag, in_flight).await?;
        if let Some(ms) = config.renderer.drain_timeout_ms {
            consumer = consumer.with_drain_timeout(std::time::Duration::from_millis(ms));
        }
        lanes.push((lane, queue, in_flight, consumer));
    }
    // Subscribed before consuming, so no publish announced from here on is missed.
    let templates = Arc::new(TemplateCache::default());
    let control = broker
        .subscribe_temporary(&broker.topology().control_exchange(), "#")
        .await?;
    tokio::spawn({
        let (templates, broker, stop) = (templates.clone(), broker.clone(), stop.clone());
        async move { templates.listen(control, broker, stop).await }
    });
    // Held-back jobs (send_at, quiet hours) leave Postgres from here when due.
    tokio::spawn(schedule::run_scheduler(
        store.clone(),
        config.renderer.clone(),
        stop.clone(),
    ));
    let renderer = Arc::new(Renderer {
        broker: broker.clone(),
        store,
        templates,
        limits: preferences::Limits::new(config.renderer.redis.clone()),
        recipients_in_flight: tokio::sync::Semaphore::new(
            config
                .renderer
                .recipients_in_flight
                .max(config.renderer.fanout_batch)
                .max(1),
        ),
        settings: config.renderer,
    });
    let mut consuming = tokio::task::JoinSet::new();
    for (lane, queue, in_flight, consumer) in lanes {
        tracing::info!(%queue, in_flight, "renderer consuming");
        let (renderer, broker, stop) = (renderer.clone(), broker.clone(), stop.clone());
        let queue: Arc<str> = queue.into();
        consuming.spawn(async move {
            // Either lane ending stops the other: the process restarts whole.
            let ended = consumer
                .run(
                    broker,
                    usize::from(in_flight),
                    stop.clone(),
                    move |delivery| {
                        let (renderer, queue) = (renderer.clone(), queue.clone());
                        async move { renderer.handle(lane, &queue, delivery).await }
                    },
                )
                .await;
            stop.cancel();
            ended
        });
    }
    let mut consumed = Ok(());
    while let Some(ended) = consuming.join_next().await {
        if let (Ok(Err(error)), Ok(())) = (ended, &consumed) {
            consumed = Err(error);
        }
    }
    stop.cancel();
    let _ = relay.await;
    broker.close().await;
    Ok(consumed?)
}

impl Renderer {
    async fn handle(&self, lane: RenderLane, queue: &str, delivery: Arc<Delivery>) -> Disposition {
        let span = herald_amqp::trace::consumer_span(queue, &delivery);
        match self.process(lane, &delivery).instrument(span.clone()).await {
            Ok(()) => Disposition::Ack,
            Err(Failure::Poison { reason, detail }) => Disposition::DeadLetter { reason, detail },
            Err(Failure::Rejected { message_id, error }) => {
                let detail = error.to_string();
                if let Err(e) = self.store.reject_message(message_id, &detail).await {
                    return Disposition::Requeue {
                        error: e.to_string(),
                    };
                }
                tracing::warn!(parent: &span, %message_id, %detail, "request rejected");
                Disposition::DeadLetter {
                    reason: "rejected",
                    detail,
                }
            }
            Err(Failure::Transient(error)) => Disposition::Requeue { error },
        }
    }

    async fn process(&self, lane: RenderLane, delivery: &Delivery) -> Result<(), Failure> {
        // A body that says it is of another schema version is not read as this one (a
        // producer ahead of this Herald); no header means this version.
        let schema = herald_amqp::header_str(
            delivery.properties.headers().as_ref(),
            headers::SCHEMA_VERSION,
        );
        if let Some(schema) = schema.filter(|s| *s != herald_contract::SCHEMA_VERSION) {
            return Err(Failure::Poison {
                reason: "unsupported_schema",
                detail: format!(
                    "x-herald-schema `{schema}`; this Herald reads `{}`",
                    herald_contract::SCHEMA_VERSION
                ),
            });
        }
        let request: NotificationRequest =
            decode_json(&delivery.data).map_err(|e| Failure::Poison {
                reason: "decode_error",
                detail: e.to_string(),
            })?;
        let id = message_id(&request, delivery)?;
        tracing::Span::current().record("herald.message_id", tracing::field::display(id));
        // Decided on the body (the stored request of a redelivery is the same one), so a
        // moved request is not read back and parsed again here.
        let to_bulk_lane = lane == RenderLane::Intake && self.is_bulk_work(&request);
        // The checks the ingress makes of a REST request, for one that came over AMQP: it is
        // stored, then rejected naming the field (before its stored form is read back, which
        // a time past year 9999 would not survive).
        let checked = herald_contract::validate::validate(&request);

        // A message already stored (accepted over REST, or a redelivery) is processed as
        // stored: its tenant and request are authoritative, not this body.
        let record = match self.store.message(id).await? {
            Some(record) => record,
            None => {
                let tenant = self.tenant_of(delivery).await?;
                let mut request = request;
                request.id = id.to_string();
                request.tenant = tenant.clone();
                let template_id = request
                    .template
                    .as_ref()
                    .map(|t| t.id.clone())
                    .unwrap_or_default();
                let json = serde_json::to_string(&request).map_err(|e| Failure::Poison {
                    reason: "decode_error",
                    detail: format!("request not storable as JSON: {e}"),
                })?;
                self.store
                    .ensure_message(NewMessage {
                        id,
                        tenant_id: tenant,
                        template_id,
                        idempotency_key: Some(request.idempotency_key.clone())
                            .filter(|k| !k.is_empty()),
                        request: json,
                        request_hash: Sha256::digest(&delivery.data).to_vec(),
                        source: "amqp",
                        traceparent: herald_telemetry::current_traceparent(),
                    })
                    .await?
            }
        };
        tracing::Span::current().record("herald.tenant", record.tenant_id.as_str());
        // Settled before rendering (rejected, cancelled, expired): nothing to do.
        if matches!(record.state.as_str(), "rejected" | "cancelled" | "expired") {
            return Ok(());
        }
        if let Err(error) = checked {
            return Err(fanout::rejected(id, error.field, error.message));
        }
        if to_bulk_lane {
            return self.move_to_bulk_lane(delivery, id).await;
        }
        let request: NotificationRequest =
            serde_json::from_str(&record.request).map_err(|e| Failure::Poison {
                reason: "decode_error",
                detail: format!("stored request: {e}"),
            })?;
        self.fan_out(&record, &request).await
    }

    fn is_bulk_work(&self, request: &NotificationRequest) -> bool {
        request.priority() == Priority::Bulk
            || request.recipients.len() > self.settings.bulk_fanout_threshold
    }

    /// Hands a stored request to the bulk lane. The copy names its message id (the stored
    /// record, not the publisher's `user_id`, which a republish cannot keep, says whose it
    /// is); a crash before the ack moves it twice, and the second fan-out finds the first's
    /// progress.
    async fn move_to_bulk_lane(&self, delivery: &Delivery, id: Uuid) -> Result<(), Failure> {
        let properties =
            herald_amqp::republishable(&delivery.properties).with_message_id(id.to_string().into());
        self.broker
            .publisher()
            .publish(
                "",
                &self.broker.topology().render_bulk_queue(),
                &delivery.data,
                properties,
            )
            .await?;
        tracing::debug!(message_id = %id, "moved to the bulk render lane");
        Ok(())
    }

    async fn tenant_of(&self, delivery: &Delivery) -> Result<String, Failure> {
        // RabbitMQ validates user_id against the connection's user, so it cannot be forged.
        let Some(user) = delivery.properties.user_id().as_ref() else {
            return Err(Failure::Poison {
                reason: "unauthenticated",
                detail: "user_id property missing: set it to the publishing RabbitMQ user".into(),
            });
        };
        self.store
            .tenant_for_amqp_user(user.as_str())
            .await?
            .ok_or_else(|| Failure::Poison {
                reason: "unknown_tenant",
                detail: format!("no tenant publishes as AMQP user `{user}`"),
            })
    }

    /// Decides the deliveries of a request and renders their jobs.
    async fn plan(
        &self,
        tenant: &str,
        message_id: Uuid,
        request: &NotificationRequest,
        recipients: &[(usize, &herald_contract::v1::Recipient)],
    ) -> Result<Result<Vec<(NewDelivery, DeliveryJob)>, RenderError>, Failure> {
        let Some(template_ref) = request.template.as_ref().filter(|t| !t.id.is_empty()) else {
            return Ok(Err(RenderError::new("template.id", "required")));
        };
        let version = (template_ref.version > 0)
            .then(|| i32::try_from(template_ref.version).unwrap_or(i32::MAX));
        let template = match self
            .templates
            .get(&self.store, tenant, &template_ref.id, version)
            .await?
        {
            Ok(template) => template,
            Err(e) => return Ok(Err(e)),
        };
        let definition = &template.definition;
        let variables: Map<String, Value> = request
            .variables
            .as_ref()
            .and_then(|v| serde_json::to_value(v).ok())
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        if let Err(e) = definition.check_variables(&variables) {
            return Ok(Err(e));
        }
        if request.recipients.is_empty() {
            return Ok(Err(RenderError::new(
                "recipients",
                "at least one recipient is required",
            )));
        }
        let wanted: Vec<String> = if request.channels.is_empty() {
            definition
                .channel_names()
                .into_iter()
                .map(String::from)
                .collect()
        } else {
            request.channels.clone()
        };
        let mut planned = Vec::new();
        // One account look-up per channel (and per named robot), not per recipient.
        let mut accounts: std::collections::HashMap<String, Option<String>> = Default::default();
        for &(index, recipient) in recipients {
            // The wanted channels this recipient can be reached on, in the request's order:
            // the first is sent, the others are its fallback chain.
            let reachable: Vec<&String> = wanted
                .iter()
                .filter(|channel| {
                    channels::ALL.contains(&channel.as_str())
                        && definition.channel_names().contains(&variant_of(channel))
                        && address_for(recipient, channel).is_some()
                })
                .collect();
            if reachable.is_empty() {
                return Ok(Err(RenderError::new(
                    format!("recipients[{index}]"),
                    format!("no address for any of the channels [{}]", wanted.join(", ")),
                )));
            }
            let mut steps = Vec::with_capacity(reachable.len());
            for channel in reachable {
                let step = self
                    .step(
                        tenant,
                        &mut accounts,
                        index,
                        recipient,
                        channel,
                        |account| {
                            let payload = template.render(
                                variant_of(channel),
                                account,
                                &template_ref.locale,
                                &variables,
                            )?;
                            if channel.as_str() == channels::WECOM_ROBOT
                                && payload["msgtype"] == "textcard"
                            {
                                return Err(RenderError::new(
                                    "channels.wecom.msgtype",
                                    "a WeCom group robot takes text or markdown, not textcard",
                                ));
                            }
                            Ok(payload)
                        },
                    )
                    .await?;
                match step {
                    Ok(step) => steps.push(FallbackStep {
                        delivery_id: Uuid::new_v5(
                            &message_id,
                            format!("{index}/{channel}").as_bytes(),
                        )
                        .to_string(),
                        ..step
                    }),
                    Err(e) => return Ok(Err(e)),
                }
            }
            let first = steps.remove(0);
            let delivery_id =
                Uuid::new_v5(&message_id, format!("{index}/{}", first.channel).as_bytes());
            let job = DeliveryJob {
                delivery_id: delivery_id.to_string(),
                message_id: message_id.to_string(),
                tenant: tenant.to_string(),
                channel: first.channel.clone(),
                provider_account: first.provider_account.clone(),
                recipient: first.recipient.clone(),
                payload: first.payload,
                priority: request.priority,
                attempt: 1,
                expires_at: request.expires_at,
                template_id: template_ref.id.clone(),
                fallback: steps,
            };
            planned.push((
                NewDelivery {
                    id: delivery_id,
                    channel: first.channel,
                    provider_account: first.provider_account,
                    recipient: first.recipient,
                },
                job,
            ));
        }
        Ok(Ok(planned))
    }
}

impl Renderer {
    /// One channel for one recipient: its sending account (the tenant's default, or the robot
    /// the recipient names, which must be the tenant's own) and its rendered payload.
    async fn step(
        &self,
        tenant: &str,
        accounts: &mut std::collections::HashMap<String, Option<String>>,
        index: usize,
        recipient: &herald_contract::v1::Recipient,
        channel: &str,
        render: impl FnOnce(&str) -> Result<Value, RenderError>,
    ) -> Result<Result<FallbackStep, RenderError>, Failure> {
        let address = address_for(recipient, channel).unwrap_or_default();
        let account = if is_robot(channel) {
            // The robot is the recipient and the account: it must be the tenant's own.
            let key = format!("{channel}:{address}");
            let owned = match accounts.get(&key) {
                Some(known) => known.is_some(),
                None => {
                    let owned = self
                        .store
                        .is_tenant_account(tenant, address, channel)
                        .await?;
                    accounts.insert(key, owned.then(|| address.to_string()));
                    owned
                }
            };
            if !owned {
                return Ok(Err(RenderError::new(
                    format!("recipients[{index}].{channel}_robot"),
                    format!("`{address}` is not one of this tenant's {channel} robots"),
                )));
            }
            Some(address.to_string())
        } else {
            match accounts.get(channel) {
                Some(account) => account.clone(),
                None => {
                    let found = self.store.default_provider_account(tenant, channel).await?;
                    accounts.insert(channel.to_string(), found.clone());
                    found
                }
            }
        };
        let Some(account) = account else {
            return Ok(Err(RenderError::new(
                "channels",
                format!("tenant has no default provider account for `{channel}`"),
            )));
        };
        let payload = match render(&account) {
            Ok(payload) => payload,
            Err(e) => return Ok(Err(e)),
        };
        Ok(Ok(FallbackStep {
            delivery_id: String::new(),
            channel: channel.to_string(),
            provider_account: account,
            recipient: address.to_string(),
            payload: serde_json::from_value(payload).ok(),
        }))
    }
}

/// Group robots: the recipient names the robot, which is also the sending account.
fn is_robot(channel: &str) -> bool {
    matches!(
        channel,
        channels::WECOM_ROBOT | channels::DINGTALK | channels::FEISHU
    )
}

/// The template variant a channel renders: WeCom group robots take the `wecom` variant's
/// text and markdown bodies.
fn variant_of(channel: &str) -> &str {
    match channel {
        channels::WECOM_ROBOT => channels::WECOM,
        other => other,
    }
}

fn address_for<'a>(
    recipient: &'a herald_contract::v1::Recipient,
    channel: &str,
) -> Option<&'a str> {
    let address = match channel {
        channels::WECHAT_TEMPLATE | channels::WECHAT_SUBSCRIBE => recipient.wechat_openid.as_str(),
        channels::WECOM => recipient.wecom_userid.as_str(),
        channels::WECOM_ROBOT => recipient.wecom_robot.as_str(),
        channels::DINGTALK => recipient.dingtalk_robot.as_str(),
        channels::FEISHU => recipient.feishu_robot.as_str(),
        channels::EMAIL => recipient.email.as_str(),
        channels::WEBHOOK => recipient.webhook_url.as_str(),
        channels::SMS => recipient.phone.as_str(),
        _ => "",
    };
    (!address.is_empty()).then_some(address)
}

/// The message id: the request's own, else one derived from the AMQP message id, else from
/// the body (so a redelivered message without ids maps to the same message).
fn message_id(request: &NotificationRequest, delivery: &Delivery) -> Result<Uuid, Failure> {
    if !request.id.is_empty() {
        return Uuid::parse_str(&request.id).map_err(|_| Failure::Poison {
            reason: "decode_error",
            detail: "id: must be a UUID".into(),
        });
    }
    if let Some(amqp_id) = delivery.properties.message_id().as_ref() {
        let amqp_id = amqp_id.as_str();
        return Ok(Uuid::parse_str(amqp_id)
            .unwrap_or_else(|_| Uuid::new_v5(&MESSAGE_ID_NAMESPACE, amqp_id.as_bytes())));
    }
    Ok(Uuid::new_v5(
        &MESSAGE_ID_NAMESPACE,
        &Sha256::digest(&delivery.data),
    ))
}
