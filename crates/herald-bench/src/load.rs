//! The producer side: requests published over AMQP with pipelined publisher confirms, or
//! POSTed to the ingress, as fast as possible or at a fixed rate; and a status-event listener
//! (what a producer sees last).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use herald_contract::v1::{NotificationRequest, Priority, StatusEvent};
use herald_contract::{SCHEMA_VERSION, encode_json, headers};
use lapin::Confirmation;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use uuid::Uuid;

/// Seconds since the Unix epoch (the clock Postgres' `now()` and the sandbox use too: all on
/// one machine).
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One request to send: its id, body and what it is for.
pub struct Outgoing {
    pub id: Uuid,
    pub body: Vec<u8>,
}

/// What the producer saw of one request.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub id: Uuid,
    pub published: f64,
    /// Publisher confirm (AMQP) or 202 (REST).
    pub accepted: Option<f64>,
}

/// A request for the demo template to these openids.
pub fn request(id: Uuid, openids: &[String], order: &str, priority: Priority) -> Outgoing {
    let mut request = heraldctl::demo::request("", order);
    request.id = id.to_string();
    request.recipients = openids
        .iter()
        .map(|openid| herald_contract::v1::Recipient {
            wechat_openid: openid.clone(),
            ..Default::default()
        })
        .collect();
    request.priority = priority as i32;
    Outgoing {
        id,
        body: encode_json::<NotificationRequest>(&request),
    }
}

/// A 28-character openid unique to (run, n).
pub fn openid(tag: &str, n: usize) -> String {
    format!("o{tag}{n:0>width$}", width = 27 - tag.len())
}

pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name(name.to_string().into()),
    )
    .await
    .with_context(|| format!("connecting to {url}"))
}

/// A channel in confirm mode.
pub async fn confirmed_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Paces sends: `None` as fast as the window allows, else the n-th at start + n / rate.
struct Pace {
    start: tokio::time::Instant,
    interval: Option<Duration>,
}

impl Pace {
    fn new(rate: Option<f64>) -> Self {
        Self {
            start: tokio::time::Instant::now(),
            interval: rate
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(1.0 / r)),
        }
    }

    async fn wait(&self, n: usize) {
        if let Some(interval) = self.interval {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            tokio::time::sleep_until(self.start + interval * n).await;
        }
    }
}

/// Publishes every request to `exchange` as the producer `user` (the tenant is the one whose
/// `amqp_user` it is), persistent, mandatory, with at most `window` confirms outstanding.
pub async fn publish_amqp(
    channel: &Channel,
    exchange: &str,
    user: &str,
    requests: Vec<Outgoing>,
    rate: Option<f64>,
    window: usize,
) -> anyhow::Result<Vec<Published>> {
    let pace = Pace::new(rate);
    let mut done = Vec::with_capacity(requests.len());
    let mut pending = FuturesUnordered::new();
    for (n, request) in requests.into_iter().enumerate() {
        pace.wait(n).await;
        while pending.len() >= window.max(1) {
            if let Some(result) = pending.next().await {
                done.push(result??);
            }
        }
        let mut table = FieldTable::default();
        table.insert(
            headers::SCHEMA_VERSION.into(),
            AMQPValue::LongString(SCHEMA_VERSION.into()),
        );
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(request.id.to_string().into())
            .with_user_id(user.to_string().into())
            .with_headers(table);
        let published = now();
        let confirm = channel
            .basic_publish(
                exchange.into(),
                "request.bench".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &request.body,
                properties,
            )
            .await?;
        let id = request.id;
        // A task of its own, so the confirm is timed when it arrives, not when this loop
        // next looks (it sleeps between paced publishes).
        pending.push(tokio::spawn(async move {
            match confirm.await? {
                Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Published {
                    id,
                    published,
                    accepted: Some(now()),
                }),
                other => bail!("request {id} not accepted by the broker: {other:?}"),
            }
        }));
    }
    while let Some(result) = pending.next().await {
        done.push(result??);
    }
    Ok(done)
}

/// POSTs every request to the ingress with at most `window` requests in flight.
pub async fn post_rest(
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    requests: Vec<Outgoing>,
    rate: Option<f64>,
    window: usize,
) -> anyhow::Result<Vec<Published>> {
    let pace = Pace::new(rate);
    let mut done = Vec::with_capacity(requests.len());
    let mut pending = FuturesUnordered::new();
    for (n, request) in requests.into_iter().enumerate() {
        pace.wait(n).await;
        while pending.len() >= window.max(1) {
            if let Some(result) = pending.next().await {
                done.push(result??);
            }
        }
        let published = now();
        let call = http
            .post(url)
            .bearer_auth(api_key)
            .header("content-type", "application/json")
            .body(request.body)
            .send();
        let id = request.id;
        pending.push(tokio::spawn(async move {
            let response = call.await.with_context(|| format!("POST {id}"))?;
            let status = response.status();
            if !status.is_success() {
                let body = response.text().await.unwrap_or_default();
                bail!("ingress answered {status} for {id}: {body}");
            }
            Ok(Published {
                id,
                published,
                accepted: Some(now()),
            })
        }));
    }
    while let Some(result) = pending.next().await {
        done.push(result??);
    }
    Ok(done)
}

/// When the producer saw each delivery's status event, by delivery id and state name.
pub type StatusTimes = Arc<Mutex<HashMap<(Uuid, i32), f64>>>;

/// Subscribes a private queue to the tenant's `delivered` and `failed` status events and
/// records when each arrives.
pub async fn listen_status(
    connection: &Connection,
    exchange: &str,
    tenant: &str,
) -> anyhow::Result<StatusTimes> {
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let name = queue.name().as_str().to_string();
    for state in ["delivered", "failed"] {
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                format!("status.{tenant}.{state}").into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let mut consumer = channel
        .basic_consume(
            name.as_str().into(),
            "herald-bench-status".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let times: StatusTimes = Arc::default();
    let sink = times.clone();
    tokio::spawn(async move {
        // Keeps the channel open as long as the consumer runs.
        let _channel = channel;
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = now();
            let Ok(event) = herald_contract::decode_json::<StatusEvent>(&delivery.data) else {
                continue;
            };
            let Ok(id) = Uuid::parse_str(&event.delivery_id) else {
                continue;
            };
            if let Ok(mut times) = sink.lock() {
                times.entry((id, event.state)).or_insert(at);
            }
        }
    });
    Ok(times)
}
