//! The dead-letter queue tools behind `heraldctl dlq list | show | replay | purge`.
//!
//! Messages are read with `basic_get` and held unacknowledged while a command works on them,
//! so nothing is removed by looking: what a command does not act on goes back to the queue
//! when its channel closes. `replay` publishes each chosen message back where it came from
//! with a publisher confirm and only then acknowledges the dead copy, so an interrupted replay
//! leaves every message either replayed or still parked (at worst both: delivery jobs are
//! idempotent).

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use herald_amqp::lapin::message::BasicGetMessage;
use herald_amqp::lapin::options::{BasicAckOptions, BasicGetOptions};
use herald_amqp::{AMQPValue, Broker, FieldTable, Lane};
use herald_contract::headers;
use herald_store::Store;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Amqp(#[from] herald_amqp::AmqpError),
    #[error("rabbitmq: {0}")]
    Broker(#[from] herald_amqp::lapin::Error),
    #[error(transparent)]
    Store(#[from] herald_store::StoreError),
}

/// Which parked messages a command acts on; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Message id (the delivery id of a delivery job), or a prefix of it.
    pub id: Option<String>,
    /// `x-herald-dead-reason` (or the broker's reason, e.g. `delivery_limit`).
    pub reason: Option<String>,
    /// The channel of a delivery job (`wechat.template`).
    pub channel: Option<String>,
    /// Parked at least this long ago.
    pub older_than: Option<Duration>,
    /// Parked at most this long ago.
    pub newer_than: Option<Duration>,
}

/// One parked message as the tools show it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The AMQP message id, or `sha256:<12 hex>` of the body when there is none.
    pub id: String,
    pub reason: String,
    pub detail: String,
    /// The queue it was consumed from, where a replay sends it.
    pub queue: Option<String>,
    pub channel: Option<String>,
    pub lane: Option<Lane>,
    pub dead_at: Option<DateTime<Utc>>,
    pub attempt: Option<u32>,
    pub exchange: String,
    pub routing_key: String,
    pub headers: serde_json::Value,
    pub body: String,
}

impl Filter {
    fn matches(&self, letter: &DeadLetter, now: DateTime<Utc>) -> bool {
        if let Some(id) = &self.id
            && !letter.id.starts_with(id.as_str())
        {
            return false;
        }
        if let Some(reason) = &self.reason
            && letter.reason != *reason
        {
            return false;
        }
        if let Some(channel) = &self.channel
            && letter.channel.as_deref() != Some(channel.as_str())
        {
            return false;
        }
        let age = letter
            .dead_at
            .and_then(|at| (now - at).to_std().ok())
            .unwrap_or_default();
        if let Some(min) = self.older_than
            && (letter.dead_at.is_none() || age < min)
        {
            return false;
        }
        if let Some(max) = self.newer_than
            && (letter.dead_at.is_none() || age > max)
        {
            return false;
        }
        true
    }
}

/// What `replay` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub replayed: usize,
    /// Failed deliveries reopened (with `reset_attempts`).
    pub reopened: usize,
    /// Chosen but left parked: no known origin, or the publish failed.
    pub skipped: Vec<(String, String)>,
    /// Stopped early (Ctrl-C); the rest stay parked.
    pub interrupted: bool,
}

/// Progress of a bulk command: called with (done, total).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// The parked messages matching `filter`, oldest first as the queue holds them. Nothing is
/// removed.
pub async fn list(broker: &Broker, filter: &Filter) -> Result<Vec<DeadLetter>, DlqError> {
    let scan = Scan::take(broker, filter).await?;
    let letters = scan.chosen.iter().map(|(l, _)| l.clone()).collect();
    scan.give_back().await;
    Ok(letters)
}

/// Replays the parked messages matching `filter` to the queues they came from. With
/// `reset_attempts` the attempt count starts again at 1 and a delivery failed by exhaustion
/// is reopened (so the replayed job is sent again instead of being acked as settled).
pub async fn replay(
    broker: &Broker,
    store: Option<&Store>,
    filter: &Filter,
    reset_attempts: bool,
    progress: Progress<'_>,
    stop: &CancellationToken,
) -> Result<ReplayReport, DlqError> {
    let scan = Scan::take(broker, filter).await?;
    let total = scan.chosen.len() as u64;
    let mut report = ReplayReport::default();
    for (done, (letter, message)) in scan.chosen.iter().enumerate() {
        if stop.is_cancelled() {
            report.interrupted = true;
            break;
        }
        progress(done as u64, total);
        let Some(queue) = letter.queue.clone() else {
            report
                .skipped
                .push((letter.id.clone(), "origin queue unknown".into()));
            continue;
        };
        if reset_attempts
            && let Some(store) = store
            && broker.topology().lane_of_queue(&queue).is_some()
            && let Ok(id) = Uuid::parse_str(&letter.id)
            && store.reopen_failed_delivery(id, "dlq replay").await?
        {
            report.reopened += 1;
        }
        let table = replay_headers(
            message.delivery.properties.headers().as_ref(),
            reset_attempts,
        );
        let properties =
            herald_amqp::republishable(&message.delivery.properties).with_headers(table);
        // Straight to the origin queue through the default exchange; confirmed before the
        // dead copy is acknowledged.
        match broker
            .publisher()
            .publish("", &queue, &message.delivery.data, properties)
            .await
        {
            Ok(()) => {
                message
                    .delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await?;
                report.replayed += 1;
            }
            Err(error) => report.skipped.push((letter.id.clone(), error.to_string())),
        }
    }
    progress(total, total);
    scan.give_back().await;
    Ok(report)
}

/// Deletes the parked messages matching `filter`; returns how many.
pub async fn purge(
    broker: &Broker,
    filter: &Filter,
    progress: Progress<'_>,
    stop: &CancellationToken,
) -> Result<usize, DlqError> {
    let scan = Scan::take(broker, filter).await?;
    let total = scan.chosen.len() as u64;
    let mut purged = 0;
    for (done, (_, message)) in scan.chosen.iter().enumerate() {
        if stop.is_cancelled() {
            break;
        }
        progress(done as u64, total);
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await?;
        purged += 1;
    }
    progress(total, total);
    scan.give_back().await;
    Ok(purged)
}

/// Every message of the dead queue, held unacknowledged on one channel.
struct Scan {
    channel: herald_amqp::lapin::Channel,
    chosen: Vec<(DeadLetter, BasicGetMessage)>,
    /// Held so `basic_get` moves on; returned to the queue with the channel.
    others: Vec<BasicGetMessage>,
}

impl Scan {
    async fn take(broker: &Broker, filter: &Filter) -> Result<Self, DlqError> {
        let channel = broker.open_channel().await?;
        let queue = broker.topology().dead_queue();
        let now = Utc::now();
        let mut chosen = Vec::new();
        let mut others = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await?
        {
            let letter = describe(broker, &message);
            if filter.matches(&letter, now) {
                chosen.push((letter, message));
            } else {
                others.push(message);
            }
        }
        Ok(Self {
            channel,
            chosen,
            others,
        })
    }

    /// Closes the channel: whatever was not acknowledged goes back to the dead queue.
    async fn give_back(self) {
        drop(self.others);
        let _ = self.channel.close(200, "OK".into()).await;
    }
}

/// Headers of a replayed copy: no dead-letter marks (ours or the broker's), no stale
/// deferral; attempt 1 if asked.
fn replay_headers(table: Option<&FieldTable>, reset_attempts: bool) -> FieldTable {
    let mut table = herald_amqp::headers_without(table, |name| {
        name.starts_with("x-herald-dead-")
            || name == "x-death"
            || name.starts_with("x-first-death-")
            || name.starts_with("x-last-death-")
            || name == "x-delivery-count"
            || name == "CC"
            || name == headers::DEFER_UNTIL
    });
    if reset_attempts {
        table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(1));
    }
    table
}

fn describe(broker: &Broker, message: &BasicGetMessage) -> DeadLetter {
    let delivery = &message.delivery;
    let table = delivery.properties.headers().as_ref();
    let text = |name: &str| herald_amqp::header_str(table, name).map(str::to_string);
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_string())
        .unwrap_or_else(|| {
            let digest = hex::encode(Sha256::digest(&delivery.data));
            format!("sha256:{}", &digest[..12])
        });
    let queue = text(headers::DEAD_QUEUE).or_else(|| text("x-first-death-queue"));
    let lane = queue
        .as_deref()
        .and_then(|q| broker.topology().lane_of_queue(q));
    let channel = lane.map(|(c, _)| c.to_string()).or_else(|| {
        serde_json::from_slice::<serde_json::Value>(&delivery.data)
            .ok()
            .and_then(|v| {
                v.get("channel")
                    .and_then(|c| c.as_str())
                    .map(str::to_string)
            })
    });
    let dead_at = herald_amqp::header_i64(table, headers::DEAD_AT)
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .or_else(|| broker_death_time(table));
    DeadLetter {
        id,
        reason: text(headers::DEAD_REASON)
            .or_else(|| text("x-first-death-reason"))
            .unwrap_or_else(|| "unknown".into()),
        detail: text(headers::DEAD_DETAIL).unwrap_or_default(),
        queue,
        channel,
        lane: lane.map(|(_, l)| l),
        dead_at,
        attempt: herald_amqp::header_u32(table, headers::ATTEMPT),
        exchange: delivery.exchange.as_str().to_string(),
        routing_key: delivery.routing_key.as_str().to_string(),
        headers: table.map(table_json).unwrap_or_default(),
        body: String::from_utf8_lossy(&delivery.data).into_owned(),
    }
}

/// When the broker itself dead-lettered a message (`x-death[0].time`).
fn broker_death_time(table: Option<&FieldTable>) -> Option<DateTime<Utc>> {
    let AMQPValue::FieldArray(deaths) = table?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("time")? {
        AMQPValue::Timestamp(seconds) => {
            Utc.timestamp_opt(i64::try_from(*seconds).ok()?, 0).single()
        }
        _ => None,
    }
}

fn table_json(table: &FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), value_json(v)))
            .collect(),
    )
}

fn value_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        AMQPValue::Boolean(b) => J::Bool(*b),
        AMQPValue::ShortShortInt(v) => J::from(*v),
        AMQPValue::ShortShortUInt(v) => J::from(*v),
        AMQPValue::ShortInt(v) => J::from(*v),
        AMQPValue::ShortUInt(v) => J::from(*v),
        AMQPValue::LongInt(v) => J::from(*v),
        AMQPValue::LongUInt(v) => J::from(*v),
        AMQPValue::LongLongInt(v) => J::from(*v),
        AMQPValue::Timestamp(v) => J::from(*v),
        AMQPValue::Float(v) => J::from(f64::from(*v)),
        AMQPValue::Double(v) => J::from(*v),
        AMQPValue::ShortString(s) => J::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => J::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(items) => J::Array(items.as_slice().iter().map(value_json).collect()),
        AMQPValue::FieldTable(table) => table_json(table),
        other => J::String(format!("{other:?}")),
    }
}

/// Parses an age like `90s`, `15m`, `2h`, `3d`.
pub fn parse_age(text: &str) -> Option<Duration> {
    let text = text.trim();
    match text.strip_suffix('d') {
        Some(days) => days
            .parse::<u64>()
            .ok()
            .and_then(|d| d.checked_mul(86_400))
            .map(Duration::from_secs),
        None => herald_amqp::parse_delay(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse() {
        assert_eq!(parse_age("3d"), Some(Duration::from_secs(3 * 86_400)));
        assert_eq!(parse_age("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_age("soon"), None);
    }

    #[test]
    fn replayed_copies_lose_dead_letter_marks() {
        let mut table = FieldTable::default();
        table.insert(
            headers::DEAD_REASON.into(),
            AMQPValue::LongString("exhausted".into()),
        );
        table.insert(
            headers::DEAD_QUEUE.into(),
            AMQPValue::LongString("q".into()),
        );
        table.insert(
            "x-first-death-queue".into(),
            AMQPValue::LongString("q".into()),
        );
        table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(8));
        table.insert(
            headers::TRACEPARENT.into(),
            AMQPValue::LongString("00-x".into()),
        );
        let kept = replay_headers(Some(&table), false);
        assert!(!kept.contains_key(headers::DEAD_REASON));
        assert!(!kept.contains_key("x-first-death-queue"));
        assert_eq!(
            herald_amqp::header_u32(Some(&kept), headers::ATTEMPT),
            Some(8)
        );
        assert!(kept.contains_key(headers::TRACEPARENT));
        let reset = replay_headers(Some(&table), true);
        assert_eq!(
            herald_amqp::header_u32(Some(&reset), headers::ATTEMPT),
            Some(1)
        );
    }
}
