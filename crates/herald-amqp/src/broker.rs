use futures::StreamExt;
use herald_contract::headers;
use lapin::message::Delivery as LapinDelivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::Instrument;

use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::topology::RetryTier;
use crate::{AmqpError, AmqpSettings, Topology};

pub type Delivery = LapinDelivery;

/// How long one attempt to connect (TCP, TLS, AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening a channel or subscribing may take before the connection is taken as lost.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish keeps trying through a lost connection before it fails.
const PUBLISH_RECOVERY: Duration = Duration::from_secs(30);

/// The connection to the broker, opened again when it is lost.
///
/// lapin's own recovery is not used: in the fault suite it hung for good after a second broker
/// restart, and could not re-declare a server-named queue. Here a lost connection is replaced
/// by a new one on the next use (one caller connects, the others wait for it); consumers
/// subscribe again and publishers open a new channel, each pacing its own retries.
struct Link {
    url: String,
    name: String,
    current: std::sync::Mutex<Arc<Connection>>,
    reconnecting: tokio::sync::Mutex<()>,
    closed: AtomicBool,
}

impl Link {
    async fn open(url: &str, name: String) -> Result<Arc<Self>, AmqpError> {
        let connection = Self::dial(url, &name).await?;
        Ok(Arc::new(Self {
            url: url.to_string(),
            name,
            current: std::sync::Mutex::new(connection),
            reconnecting: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
        }))
    }

    async fn dial(url: &str, name: &str) -> Result<Arc<Connection>, AmqpError> {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = within(CONNECT_TIMEOUT, Connection::connect(url, properties)).await?;
        Ok(Arc::new(connection))
    }

    fn current(&self) -> Arc<Connection> {
        match self.current.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A usable connection: the current one, or a new one if it is gone (one attempt).
    async fn connected(&self) -> Result<Arc<Connection>, AmqpError> {
        let current = self.current();
        if current.status().connected() {
            return Ok(current);
        }
        let _turn = self.reconnecting.lock().await;
        let current = self.current();
        if current.status().connected() {
            return Ok(current);
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(AmqpError::Closed);
        }
        let fresh = Self::dial(&self.url, &self.name).await?;
        tracing::info!(connection = %self.name, "connected to the broker again");
        match self.current.lock() {
            Ok(mut guard) => *guard = fresh.clone(),
            Err(poisoned) => *poisoned.into_inner() = fresh.clone(),
        }
        Ok(fresh)
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.current().close(200, "shutdown".into()).await;
    }
}

/// `future`, or [`AmqpError::Timeout`] after `limit`.
async fn within<T>(
    limit: Duration,
    future: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(AmqpError::Timeout(limit)),
    }
}

/// Pauses between attempts to reach the broker again: 250 ms doubling to 5 s, jittered.
fn reconnect_pauses() -> impl Iterator<Item = Duration> {
    backon::BackoffBuilder::build(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .with_jitter(),
    )
}

/// One connection to the broker, opened again when lost, with a confirmed publisher channel.
#[derive(Clone)]
pub struct Broker {
    link: Arc<Link>,
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
    /// A connection lost later is opened again on the next use (see [`Link`]).
    pub async fn connect(settings: &AmqpSettings, service: &str) -> Result<Self, AmqpError> {
        let topology = Topology::new(settings).map_err(AmqpError::Config)?;
        let link = Link::open(&settings.url, format!("herald-{service}")).await?;
        let channel = Publisher::open_channel(&link.current()).await?;
        Ok(Self {
            publisher: Publisher {
                link: link.clone(),
                channel: Arc::new(tokio::sync::Mutex::new(channel)),
            },
            link,
            topology,
            prefetch: settings.prefetch,
            depth_sample_interval: Duration::from_millis(settings.depth_sample_interval_ms),
        })
    }

    /// How often consumers sample queue depths (zero: never).
    pub fn depth_sample_interval(&self) -> Duration {
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
        let channel = self.open_channel().await?;
        let result = self.topology.declare(&channel).await;
        let _ = channel.close(200, "OK".into()).await;
        result
    }

    /// Deletes the whole topology (test teardown).
    pub async fn delete_topology(&self) -> Result<(), AmqpError> {
        let channel = self.open_channel().await?;
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
        let subscription = Subscription {
            queue: queue.to_string(),
            consumer_tag: consumer_tag.to_string(),
            prefetch: prefetch.max(1),
        };
        let (channel, inner) = subscription.subscribe(&self.link).await?;
        Ok(Consumer {
            link: self.link.clone(),
            resubscribe: Some(subscription),
            channel,
            inner,
            queue: queue.to_string(),
            drain_timeout: None,
        })
    }

    /// A plain channel on this connection (operator tools: `basic_get`, acks by hand).
    pub async fn open_channel(&self) -> Result<Channel, AmqpError> {
        let connection = self.link.connected().await?;
        within(CHANNEL_TIMEOUT, connection.create_channel()).await
    }

    /// Messages ready in `queue` now (see [`crate::depth::queue_depth`]), on a channel of its own.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, AmqpError> {
        let channel = self.open_channel().await?;
        let depth = crate::depth::queue_depth(&channel, queue).await;
        let _ = channel.close(200, "OK".into()).await;
        depth
    }

    /// Subscribes a private, server-named queue (gone when this connection closes) to
    /// `exchange` with `binding_key`: how a producer or an operator watches status events.
    /// Such a subscription is not renewed: when the connection is lost, `next` answers an
    /// error, and the caller (who missed whatever was published meanwhile) subscribes again.
    pub async fn subscribe_temporary(
        &self,
        exchange: &str,
        binding_key: &str,
    ) -> Result<Consumer, AmqpError> {
        let channel = self.open_channel().await?;
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
            link: self.link.clone(),
            resubscribe: None,
            channel,
            inner,
            queue: name,
            drain_timeout: None,
        })
    }

    /// True while the connection is usable (for readiness checks).
    pub fn is_connected(&self) -> bool {
        self.link.current().status().connected()
    }

    /// Closes the connection for good (nothing reconnects after this).
    pub async fn close(&self) {
        self.link.close().await;
    }
}

/// What a durable-queue consumer subscribes to, kept to subscribe again after a loss.
struct Subscription {
    queue: String,
    consumer_tag: String,
    prefetch: u16,
}

impl Subscription {
    async fn subscribe(&self, link: &Link) -> Result<(Channel, lapin::Consumer), AmqpError> {
        let connection = link.connected().await?;
        within(CHANNEL_TIMEOUT, async {
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await?;
            let inner = channel
                .basic_consume(
                    self.queue.as_str().into(),
                    self.consumer_tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok((channel, inner))
        })
        .await
    }
}

/// A queue subscription. One on a durable queue rides out a lost connection by subscribing
/// again on a new one (messages unacknowledged on the old channel go back to the queue, and
/// their acks fail harmlessly); a temporary one ends with an error.
pub struct Consumer {
    link: Arc<Link>,
    resubscribe: Option<Subscription>,
    pub(crate) channel: Channel,
    inner: lapin::Consumer,
    queue: String,
    pub(crate) drain_timeout: Option<Duration>,
}

impl Consumer {
    /// On shutdown, wait at most this long for the deliveries in flight; then abort them (they
    /// are not acknowledged, so the broker redelivers them once this connection closes).
    /// Without it, shutdown waits for every one.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = Some(timeout);
        self
    }

    /// The next delivery; `None` once the broker cancels the subscription (queue deleted).
    /// A lost connection is waited out (durable queues) or answered with an error (temporary).
    pub async fn next(&mut self) -> Option<Result<Delivery, AmqpError>> {
        loop {
            let lost = match self.inner.next().await {
                Some(Ok(delivery)) => return Some(Ok(delivery)),
                Some(Err(err)) => AmqpError::Broker(err),
                // Cancelled: by the broker (queue deleted) while the channel lives on, or by
                // the channel's end.
                None if self.channel.status().connected() => return None,
                None => AmqpError::Cancelled(self.queue.clone()),
            };
            let Some(subscription) = &self.resubscribe else {
                return Some(Err(lost));
            };
            tracing::warn!(queue = %self.queue, error = %lost, "subscription lost; subscribing again");
            let mut pauses = reconnect_pauses();
            loop {
                tokio::time::sleep(pauses.next().unwrap_or(Duration::from_secs(5))).await;
                match subscription.subscribe(&self.link).await {
                    Ok((channel, inner)) => {
                        tracing::info!(queue = %self.queue, "subscribed again");
                        self.channel = channel;
                        self.inner = inner;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(queue = %self.queue, %error, "broker still unreachable");
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
    link: Arc<Link>,
    /// Replaced when it is closed: by the broker (a refused publish closes the channel, not
    /// the connection) or with its connection.
    channel: Arc<tokio::sync::Mutex<Channel>>,
}

impl Publisher {
    async fn open_channel(connection: &Connection) -> Result<Channel, AmqpError> {
        within(CHANNEL_TIMEOUT, async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok(channel)
        })
        .await
    }

    /// The publishing channel, opened again (on a new connection if need be) when closed.
    async fn channel(&self) -> Result<Channel, AmqpError> {
        let mut current = self.channel.lock().await;
        if !current.status().connected() {
            let connection = self.link.connected().await?;
            *current = Self::open_channel(&connection).await?;
        }
        Ok(current.clone())
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
        let give_up_at = tokio::time::Instant::now() + PUBLISH_RECOVERY;
        let mut pauses = reconnect_pauses();
        loop {
            let attempt = match self.channel().await {
                Ok(channel) => {
                    self.try_publish(
                        &channel,
                        exchange,
                        routing_key,
                        body,
                        properties.clone(),
                        mandatory,
                    )
                    .await
                }
                Err(error) => Err(error),
            };
            match attempt {
                // The broker never confirmed this try, so publishing again keeps
                // at-least-once; a closed channel or connection is opened again first.
                Err(error @ (AmqpError::Broker(_) | AmqpError::Timeout(_)))
                    if tokio::time::Instant::now() < give_up_at =>
                {
                    tracing::warn!(%error, exchange, "publish interrupted");
                    tokio::time::sleep(pauses.next().unwrap_or(Duration::from_secs(5))).await;
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
