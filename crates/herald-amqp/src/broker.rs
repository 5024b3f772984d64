use futures::StreamExt;
use herald_contract::headers;
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use std::sync::Arc;

use tracing::Instrument;

use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::topology::RetryTier;
use crate::{AmqpError, AmqpSettings, Topology};

pub type Delivery = LapinDelivery;

/// One auto-recovering connection with a confirmed publisher channel.
#[derive(Clone)]
pub struct Broker {
    connection: Arc<Connection>,
    publisher: Publisher,
    topology: Topology,
    prefetch: u16,
    depth_sample_interval: std::time::Duration,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("prefix", &self.topology.prefix())
            .finish()
    }
}

impl Broker {
    /// Connects (naming the connection after the service) and opens a confirmed publisher.
    /// lapin recovers the connection and its channels by itself after a loss.
    pub async fn connect(settings: &AmqpSettings, service: &str) -> Result<Self, AmqpError> {
        Self::open(settings, service, true).await
    }

    /// Connects without lapin's own recovery: a lost connection ends every consumer with an
    /// error at once, for a service whose supervisor reconnects and starts over (the sender:
    /// jobs whose acks were lost are redelivered and recognised as settled). lapin's recovery
    /// could leave an ack waiting on a channel that never came back.
    pub async fn connect_supervised(
        settings: &AmqpSettings,
        service: &str,
    ) -> Result<Self, AmqpError> {
        Self::open(settings, service, false).await
    }

    async fn open(
        settings: &AmqpSettings,
        service: &str,
        recover: bool,
    ) -> Result<Self, AmqpError> {
        let topology = Topology::new(settings).map_err(AmqpError::Config)?;
        let mut properties = ConnectionProperties::default()
            .with_connection_name(format!("herald-{service}").into());
        if recover {
            properties = properties.enable_auto_recover();
        }
        let connection = Connection::connect(&settings.url, properties).await?;
        let connection = Arc::new(connection);
        let channel = Publisher::open_channel(&connection).await?;
        Ok(Self {
            publisher: Publisher {
                connection: connection.clone(),
                channel: Arc::new(std::sync::Mutex::new(channel)),
            },
            connection,
            topology,
            prefetch: settings.prefetch,
            depth_sample_interval: std::time::Duration::from_millis(
                settings.depth_sample_interval_ms,
            ),
        })
    }

    /// How often consumers sample queue depths (zero: never).
    pub fn depth_sample_interval(&self) -> std::time::Duration {
        self.depth_sample_interval
    }

    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Declares the whole topology (idempotent).
    pub async fn declare_topology(&self) -> Result<(), AmqpError> {
        let channel = self.connection.create_channel().await?;
        let result = self.topology.declare(&channel).await;
        let _ = channel.close(200, "OK".into()).await;
        result
    }

    /// Deletes the whole topology (test teardown).
    pub async fn delete_topology(&self) -> Result<(), AmqpError> {
        let channel = self.connection.create_channel().await?;
        let result = self.topology.delete(&channel).await;
        let _ = channel.close(200, "OK".into()).await;
        result
    }

    /// Starts consuming `queue` on its own channel with the configured prefetch.
    pub async fn consume(&self, queue: &str, consumer_tag: &str) -> Result<Consumer, AmqpError> {
        self.consume_with_prefetch(queue, consumer_tag, self.prefetch)
            .await
    }

    /// Starts consuming `queue` on its own channel holding at most `prefetch` unacknowledged
    /// deliveries (size it to the consumer's concurrency).
    pub async fn consume_with_prefetch(
        &self,
        queue: &str,
        consumer_tag: &str,
        prefetch: u16,
    ) -> Result<Consumer, AmqpError> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await?;
        let inner = channel
            .basic_consume(
                queue.into(),
                consumer_tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Consumer {
            channel,
            inner,
            queue: queue.to_string(),
            drain_timeout: None,
        })
    }

    /// A plain channel on this connection (operator tools: `basic_get`, acks by hand).
    pub async fn open_channel(&self) -> Result<Channel, AmqpError> {
        Ok(self.connection.create_channel().await?)
    }

    /// Subscribes a private, server-named queue (gone when this connection closes) to
    /// `exchange` with `binding_key`: how a producer or an operator watches status events.
    pub async fn subscribe_temporary(
        &self,
        exchange: &str,
        binding_key: &str,
    ) -> Result<Consumer, AmqpError> {
        let channel = self.connection.create_channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                lapin::options::QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let name = queue.name().as_str().to_string();
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                binding_key.into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let inner = channel
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Consumer {
            channel,
            inner,
            queue: name,
            drain_timeout: None,
        })
    }

    /// True while the connection is usable (for readiness checks).
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    pub async fn close(&self) {
        let _ = self.connection.close(200, "shutdown".into()).await;
    }
}

/// A queue subscription that rides out broker reconnects.
pub struct Consumer {
    pub(crate) channel: Channel,
    inner: lapin::Consumer,
    queue: String,
    pub(crate) drain_timeout: Option<std::time::Duration>,
}

impl Consumer {
    /// On shutdown, wait at most this long for the deliveries in flight; then abort them (they
    /// are not acknowledged, so the broker redelivers them once this connection closes).
    /// Without it, shutdown waits for every one.
    pub fn with_drain_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.drain_timeout = Some(timeout);
        self
    }

    /// The next delivery; `None` once the consumer is cancelled or the connection is gone for good.
    pub async fn next(&mut self) -> Option<Result<Delivery, AmqpError>> {
        loop {
            match self.inner.next().await? {
                Ok(delivery) => return Some(Ok(delivery)),
                Err(err) => {
                    tracing::warn!(queue = %self.queue, error = %err, "consumer interrupted; waiting for recovery");
                    if let Err(err) = self.channel.wait_for_recovery(err).await {
                        return Some(Err(err.into()));
                    }
                }
            }
        }
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }
}

/// Whether a published message must reach a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Work that some queue must take: unroutable is an error (`mandatory`).
    Required,
    /// An announcement (status events): no listener yet is normal.
    Optional,
}

/// Publishes with publisher confirms; every call returns only once the broker has the message.
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<Connection>,
    /// Replaced when the broker closes it (a refused publish closes the channel, not the
    /// connection); connection-level recovery is lapin's.
    channel: Arc<std::sync::Mutex<Channel>>,
}

impl Publisher {
    async fn open_channel(connection: &Connection) -> Result<Channel, AmqpError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    fn channel(&self) -> Channel {
        match self.channel.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Opens a new channel if `failed` is still the current one and only it is gone.
    async fn replace_closed(&self, failed: &Channel) -> Result<bool, AmqpError> {
        if !self.connection.status().connected() || failed.status().connected() {
            return Ok(false);
        }
        let fresh = Self::open_channel(&self.connection).await?;
        let mut guard = match self.channel.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.id() == failed.id() {
            tracing::warn!("publisher channel was closed by the broker; opened a new one");
            *guard = fresh;
        }
        Ok(true)
    }

    /// Publishes persistently and waits for the confirm; an unroutable message is an error.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        self.publish_routed(exchange, routing_key, body, properties, Routing::Required)
            .await
    }

    /// Publishes persistently and waits for the confirm; `routing` says whether a message no
    /// queue takes is an error (work) or normal (announcements nobody listens to yet).
    pub async fn publish_routed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        routing: Routing,
    ) -> Result<(), AmqpError> {
        // A producer span per publish; its context is what the consumer continues. A message
        // that already carries a trace (an outbox row written earlier, a retried job) is
        // published as part of that trace.
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("{exchange} publish"),
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.operation = "publish",
            messaging.destination.name = %exchange,
            messaging.rabbitmq.destination.routing_key = %routing_key,
        );
        let mut table = properties.headers().clone().unwrap_or_default();
        table.insert(
            headers::PUBLISHED_AT.into(),
            AMQPValue::LongLongInt(crate::depth::now_ms()),
        );
        crate::trace::set_parent_from(&span, Some(&table));
        crate::trace::inject_span(&span, &mut table);
        let properties = properties.with_delivery_mode(2).with_headers(table);
        self.confirmed_publish(exchange, routing_key, body, properties, routing)
            .instrument(span)
            .await
    }

    async fn confirmed_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        routing: Routing,
    ) -> Result<(), AmqpError> {
        let mandatory = routing == Routing::Required;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let channel = self.channel();
            match self
                .try_publish(
                    &channel,
                    exchange,
                    routing_key,
                    body,
                    properties.clone(),
                    mandatory,
                )
                .await
            {
                Err(AmqpError::Broker(err)) if attempts < 3 => {
                    // The broker never confirmed this try, so publishing again keeps
                    // at-least-once. A channel the broker closed is replaced; a connection
                    // being recovered is waited for.
                    tracing::warn!(error = %err, exchange, "publish interrupted");
                    if self.replace_closed(&channel).await? {
                        continue;
                    }
                    if let Err(err) = channel.wait_for_recovery(err).await {
                        return Err(err.into());
                    }
                }
                other => return other,
            }
        }
    }

    async fn try_publish(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), AmqpError> {
        let confirmation = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(AmqpError::Unroutable {
                exchange: exchange.into(),
                routing_key: routing_key.into(),
            }),
            Confirmation::Nack(_) => Err(AmqpError::Nacked {
                exchange: exchange.into(),
                routing_key: routing_key.into(),
            }),
        }
    }

    /// Publishes a JSON body with string headers (outbox rows, events).
    pub async fn publish_json(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: impl IntoIterator<Item = (String, String)>,
        routing: Routing,
    ) -> Result<(), AmqpError> {
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert(name.into(), AMQPValue::LongString(value.into()));
        }
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(table);
        self.publish_routed(exchange, routing_key, body, properties, routing)
            .await
    }

    /// Parks a delivery job in a retry tier; when the tier's TTL expires the broker routes it
    /// back to the deliveries exchange under `routing_key` (carried in the CC header, which
    /// dead-lettering keeps, so one tier queue serves every channel).
    pub async fn publish_retry(
        &self,
        topology: &Topology,
        tier: &RetryTier,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        // The next attempt links back to this one (it is also its descendant, through the
        // retry publish; the link makes the attempts easy to walk in a trace view).
        if let Some(traceparent) = herald_telemetry::current_traceparent() {
            headers.insert(
                headers::RETRY_OF.into(),
                AMQPValue::LongString(traceparent.into()),
            );
        }
        headers.insert(
            "CC".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                routing_key.into(),
            )])),
        );
        self.publish(
            &topology.retry_exchange(),
            &tier.name,
            body,
            properties.with_headers(headers),
        )
        .await
    }
}

/// Publishes `delivery` to the dead-letter exchange with reason headers, keeping its body,
/// properties and routing key. The caller acks the original only after this returns `Ok`.
pub async fn dead_letter(
    publisher: &Publisher,
    topology: &Topology,
    delivery: &Delivery,
    queue: &str,
    reason: &str,
    detail: &str,
) -> Result<(), AmqpError> {
    let mut table = delivery.properties.headers().clone().unwrap_or_default();
    if let Some(user) = delivery.properties.user_id() {
        table.insert(
            headers::ORIGINAL_USER.into(),
            AMQPValue::LongString(user.as_str().into()),
        );
    }
    table.insert(
        headers::DEAD_REASON.into(),
        AMQPValue::LongString(reason.into()),
    );
    // Keep the detail short enough for any header consumer; the body is kept whole.
    let detail: String = detail.chars().take(1000).collect();
    table.insert(
        headers::DEAD_DETAIL.into(),
        AMQPValue::LongString(detail.clone().into()),
    );
    table.insert(
        headers::DEAD_QUEUE.into(),
        AMQPValue::LongString(queue.into()),
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    table.insert(headers::DEAD_AT.into(), AMQPValue::LongLongInt(now_ms));
    let routing_key = if delivery.routing_key.as_str().is_empty() {
        queue.to_string()
    } else {
        delivery.routing_key.as_str().to_string()
    };
    tracing::warn!(queue, reason, %detail, "dead-lettering message");
    publisher
        .publish(
            &topology.dead_letter_exchange(),
            &routing_key,
            &delivery.data,
            republishable(&delivery.properties).with_headers(table),
        )
        .await
}

/// The properties of a consumed message, fit to publish again from Herald's own connection:
/// without `user_id` (RabbitMQ refuses a user_id other than the connection's, and closes the
/// channel) and without `expiration` (a parked or delayed copy must not vanish; RabbitMQ drops
/// it when dead-lettering too).
pub fn republishable(properties: &BasicProperties) -> BasicProperties {
    let mut copy = BasicProperties::default();
    if let Some(v) = properties.content_type() {
        copy = copy.with_content_type(v.clone());
    }
    if let Some(v) = properties.content_encoding() {
        copy = copy.with_content_encoding(v.clone());
    }
    if let Some(v) = properties.headers() {
        copy = copy.with_headers(v.clone());
    }
    if let Some(v) = properties.delivery_mode() {
        copy = copy.with_delivery_mode(*v);
    }
    if let Some(v) = properties.priority() {
        copy = copy.with_priority(*v);
    }
    if let Some(v) = properties.correlation_id() {
        copy = copy.with_correlation_id(v.clone());
    }
    if let Some(v) = properties.reply_to() {
        copy = copy.with_reply_to(v.clone());
    }
    if let Some(v) = properties.message_id() {
        copy = copy.with_message_id(v.clone());
    }
    if let Some(v) = properties.timestamp() {
        copy = copy.with_timestamp(*v);
    }
    if let Some(v) = properties.kind() {
        copy = copy.with_type(v.clone());
    }
    if let Some(v) = properties.app_id() {
        copy = copy.with_app_id(v.clone());
    }
    copy
}
