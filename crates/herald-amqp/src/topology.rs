use std::time::Duration;

use herald_contract::channels;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use serde::{Deserialize, Serialize};

use crate::AmqpError;

/// Broker settings shared by every service (`[amqp]` in herald.toml).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AmqpSettings {
    pub url: String,
    /// Every exchange and queue name starts with `<prefix>.`.
    pub prefix: String,
    /// Unacknowledged deliveries a consumer holds at once.
    pub prefetch: u16,
    /// Redeliveries of one message (crash loops) before the broker dead-letters it.
    pub delivery_limit: u32,
    /// Retry delay tiers, shortest first (`500ms`, `1s`, `2m`, `1h`).
    pub retry_tiers: Vec<String>,
    /// When set, queues vanish after being unused this long (test runs; never in production).
    pub queue_expires_ms: Option<u64>,
    /// How often consumers sample their queue's and the dead-letter queue's depth into
    /// `herald_queue_depth`/`herald_dlq_depth`; 0 turns sampling off.
    pub depth_sample_interval_ms: u64,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: "herald".into(),
            prefetch: 32,
            delivery_limit: 5,
            retry_tiers: ["1s", "5s", "30s", "2m", "10m", "1h"]
                .map(String::from)
                .to_vec(),
            queue_expires_ms: None,
            depth_sample_interval_ms: 10_000,
        }
    }
}

/// A priority lane of a channel. RabbitMQ 3.10's quorum queues have no message priorities, so
/// each lane is a queue of its own: `send.<channel>` (normal, routing key `<channel>`) and
/// `send.<channel>.<lane>` (routing key `<channel>.<lane>`) for urgent, high and bulk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    Urgent,
    High,
    Normal,
    Bulk,
}

impl Lane {
    /// Every lane, most urgent first.
    pub const ALL: [Lane; 4] = [Lane::Urgent, Lane::High, Lane::Normal, Lane::Bulk];

    pub fn name(self) -> &'static str {
        match self {
            Lane::Urgent => "urgent",
            Lane::High => "high",
            Lane::Normal => "normal",
            Lane::Bulk => "bulk",
        }
    }

    /// The suffix of the lane's queue name and routing key (none for normal).
    fn suffix(self) -> Option<&'static str> {
        (self != Lane::Normal).then(|| self.name())
    }
}

impl From<herald_contract::v1::Priority> for Lane {
    fn from(priority: herald_contract::v1::Priority) -> Self {
        use herald_contract::v1::Priority;
        match priority {
            Priority::Urgent => Lane::Urgent,
            Priority::High => Lane::High,
            Priority::Normal | Priority::Unspecified => Lane::Normal,
            Priority::Bulk => Lane::Bulk,
        }
    }
}

/// A queue to declare: (name, arguments, [(exchange, binding key)]).
type QueueSpec = (String, FieldTable, Vec<(String, String)>);

/// One retry tier: a queue whose messages wait `delay`, then dead-letter back to deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryTier {
    pub name: String,
    pub delay: Duration,
}

/// The names of Herald's exchanges and queues under one prefix, and their declaration.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    delivery_limit: u32,
    queue_expires_ms: Option<u64>,
    tiers: Vec<RetryTier>,
}

/// Parses `250ms`, `5s`, `2m`, `1h`.
pub fn parse_delay(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1_000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

impl Topology {
    /// Builds the names; fails on a retry tier that is not a duration.
    pub fn new(settings: &AmqpSettings) -> Result<Self, String> {
        let mut tiers = settings
            .retry_tiers
            .iter()
            .map(|name| {
                parse_delay(name)
                    .map(|delay| RetryTier {
                        name: name.clone(),
                        delay,
                    })
                    .ok_or_else(|| format!("amqp.retry_tiers: `{name}` is not a delay like 5s"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        tiers.sort_by_key(|t| t.delay);
        if tiers.is_empty() {
            return Err("amqp.retry_tiers: at least one tier is needed".into());
        }
        Ok(Self {
            prefix: settings.prefix.clone(),
            delivery_limit: settings.delivery_limit,
            queue_expires_ms: settings.queue_expires_ms,
            tiers,
        })
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}.{}", self.prefix, suffix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn requests_exchange(&self) -> String {
        self.name("requests")
    }
    pub fn deliveries_exchange(&self) -> String {
        self.name("deliveries")
    }
    pub fn retry_exchange(&self) -> String {
        self.name("retry")
    }
    pub fn dead_letter_exchange(&self) -> String {
        self.name("dlx")
    }
    pub fn events_exchange(&self) -> String {
        self.name("events")
    }
    pub fn status_exchange(&self) -> String {
        self.name("status")
    }
    pub fn control_exchange(&self) -> String {
        self.name("control")
    }
    /// Where every request arrives (bound to the requests exchange with `#`).
    pub fn render_queue(&self) -> String {
        self.name("render")
    }
    /// The renderer's second lane: bulk requests and large fan-outs, moved here from the
    /// render queue so that the requests behind them are not held up (published to through
    /// the default exchange; no binding).
    pub fn render_bulk_queue(&self) -> String {
        self.name("render.bulk")
    }
    /// The normal lane's queue of `channel`.
    pub fn send_queue(&self, channel: &str) -> String {
        self.name(&format!("send.{channel}"))
    }
    /// The queue of one lane of `channel` (`send.<channel>` for normal).
    pub fn lane_queue(&self, channel: &str, lane: Lane) -> String {
        match lane.suffix() {
            Some(suffix) => self.name(&format!("send.{channel}.{suffix}")),
            None => self.send_queue(channel),
        }
    }
    /// The routing key on the deliveries exchange (and in a retry's `CC`) of one lane.
    pub fn lane_routing_key(&self, channel: &str, lane: Lane) -> String {
        match lane.suffix() {
            Some(suffix) => format!("{channel}.{suffix}"),
            None => channel.to_string(),
        }
    }
    /// The channel and lane whose queue this is, if it is a send queue of a known channel.
    pub fn lane_of_queue(&self, queue: &str) -> Option<(&'static str, Lane)> {
        channels::ALL.iter().find_map(|channel| {
            Lane::ALL
                .into_iter()
                .find(|lane| self.lane_queue(channel, *lane) == queue)
                .map(|lane| (*channel, lane))
        })
    }
    pub fn retry_queue(&self, tier: &RetryTier) -> String {
        self.name(&format!("retry.{}", tier.name))
    }
    pub fn dead_queue(&self) -> String {
        self.name("dead")
    }
    /// The status projector's queue on the events exchange.
    pub fn projector_queue(&self) -> String {
        self.name("projector")
    }
    /// The status webhook dispatcher's queue on the status exchange (`status.#`).
    pub fn webhook_queue(&self) -> String {
        self.name("webhooks")
    }
    pub fn retry_tiers(&self) -> &[RetryTier] {
        &self.tiers
    }

    /// The tier with this name.
    pub fn tier(&self, name: &str) -> Option<&RetryTier> {
        self.tiers.iter().find(|t| t.name == name)
    }

    /// The longest tier not longer than `wanted` (the shortest if every tier is longer): a
    /// job waiting for a point in time hops through these without overshooting it by more
    /// than the shortest tier.
    pub fn tier_at_most(&self, wanted: Duration) -> &RetryTier {
        self.tiers
            .iter()
            .rev()
            .find(|t| t.delay <= wanted)
            .unwrap_or(&self.tiers[0])
    }

    /// The shortest tier whose delay is at least `wanted` (the longest if none is).
    pub fn tier_for(&self, wanted: Duration) -> &RetryTier {
        self.tiers
            .iter()
            .find(|t| t.delay >= wanted)
            .or_else(|| self.tiers.last())
            .unwrap_or(&self.tiers[0])
    }

    /// Tier for the n-th retry (1-based): the schedule walks the tiers and stays on the last.
    pub fn tier_for_retry(&self, retry: u32) -> &RetryTier {
        let index = (retry.max(1) as usize - 1).min(self.tiers.len() - 1);
        &self.tiers[index]
    }

    fn work_queue_args(&self) -> FieldTable {
        let mut args = self.base_queue_args();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(self.delivery_limit.into()),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange().into()),
        );
        // Quorum queues dead-letter at-most-once unless told otherwise; a parked message must not vanish.
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args
    }

    fn base_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        if let Some(ms) = self.queue_expires_ms {
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
            );
        }
        args
    }

    fn retry_queue_args(&self, tier: &RetryTier) -> FieldTable {
        let mut args = self.base_queue_args();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(tier.delay.as_millis()).unwrap_or(i64::MAX)),
        );
        // Expired messages go back to the deliveries exchange under their CC routing key
        // (the channel), see Publisher::publish_retry.
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.deliveries_exchange().into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        args
    }

    fn exchanges(&self) -> Vec<(String, ExchangeKind)> {
        vec![
            (self.requests_exchange(), ExchangeKind::Topic),
            (self.deliveries_exchange(), ExchangeKind::Topic),
            (self.retry_exchange(), ExchangeKind::Direct),
            (self.dead_letter_exchange(), ExchangeKind::Topic),
            (self.events_exchange(), ExchangeKind::Topic),
            (self.status_exchange(), ExchangeKind::Topic),
            (self.control_exchange(), ExchangeKind::Fanout),
        ]
    }

    fn queues(&self) -> Vec<QueueSpec> {
        let mut queues = vec![
            (
                self.render_queue(),
                self.work_queue_args(),
                vec![(self.requests_exchange(), "#".to_string())],
            ),
            (self.render_bulk_queue(), self.work_queue_args(), vec![]),
            (
                self.projector_queue(),
                self.work_queue_args(),
                vec![(self.events_exchange(), "#".to_string())],
            ),
            (
                self.dead_queue(),
                self.base_queue_args(),
                vec![(self.dead_letter_exchange(), "#".to_string())],
            ),
            (
                self.webhook_queue(),
                self.work_queue_args(),
                vec![(self.status_exchange(), "status.#".to_string())],
            ),
        ];
        for channel in channels::ALL {
            for lane in Lane::ALL {
                queues.push((
                    self.lane_queue(channel, lane),
                    self.work_queue_args(),
                    vec![(
                        self.deliveries_exchange(),
                        self.lane_routing_key(channel, lane),
                    )],
                ));
            }
        }
        for tier in &self.tiers {
            queues.push((
                self.retry_queue(tier),
                self.retry_queue_args(tier),
                vec![(self.retry_exchange(), tier.name.clone())],
            ));
        }
        queues
    }

    /// Declares every exchange, queue and binding; safe to run any number of times.
    pub async fn declare(&self, channel: &Channel) -> Result<(), AmqpError> {
        for (exchange, kind) in self.exchanges() {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }
        for (queue, args, bindings) in self.queues() {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args,
                )
                .await?;
            for (exchange, key) in bindings {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Removes every exchange and queue of this prefix (test teardown).
    pub async fn delete(&self, channel: &Channel) -> Result<(), AmqpError> {
        for (queue, _, _) in self.queues() {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for (exchange, _) in self.exchanges() {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Every queue name with its binding keys, for operators and docs.
    pub fn describe(&self) -> Vec<(String, Vec<(String, String)>)> {
        self.queues().into_iter().map(|(q, _, b)| (q, b)).collect()
    }

    /// The whole topology as a RabbitMQ definitions document for `vhost` (the format of
    /// `rabbitmqctl export_definitions`, read by `import_definitions`, the management API and
    /// `load_definitions`): every exchange, queue (with its arguments) and binding that
    /// `declare` creates, sorted by name. `deploy/rabbitmq/definitions.json` is this for the
    /// default settings; a test keeps the two equal.
    pub fn definitions(&self, vhost: &str) -> serde_json::Value {
        use serde_json::{Map, Value, json};
        fn argument(value: &AMQPValue) -> Value {
            match value {
                AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes())),
                AMQPValue::ShortString(s) => Value::from(s.as_str()),
                AMQPValue::Boolean(b) => Value::from(*b),
                AMQPValue::ShortInt(n) => Value::from(*n),
                AMQPValue::LongInt(n) => Value::from(*n),
                AMQPValue::LongUInt(n) => Value::from(*n),
                AMQPValue::LongLongInt(n) => Value::from(*n),
                other => Value::from(format!("{other:?}")),
            }
        }
        let mut exchanges = self.exchanges();
        exchanges.sort_by(|a, b| a.0.cmp(&b.0));
        let exchanges: Vec<Value> = exchanges
            .into_iter()
            .map(|(name, kind)| {
                let kind = match kind {
                    ExchangeKind::Custom(custom) => custom,
                    ExchangeKind::Direct => "direct".into(),
                    ExchangeKind::Fanout => "fanout".into(),
                    ExchangeKind::Headers => "headers".into(),
                    ExchangeKind::Topic => "topic".into(),
                };
                json!({"name": name, "vhost": vhost, "type": kind, "durable": true,
                       "auto_delete": false, "internal": false, "arguments": {}})
            })
            .collect();
        let mut queues = self.queues();
        queues.sort_by(|a, b| a.0.cmp(&b.0));
        let mut bindings = Vec::new();
        let queues: Vec<Value> = queues
            .into_iter()
            .map(|(name, args, bound)| {
                for (exchange, key) in bound {
                    bindings.push((exchange, name.clone(), key));
                }
                let arguments: Map<String, Value> = args
                    .inner()
                    .iter()
                    .map(|(key, value)| (key.to_string(), argument(value)))
                    .collect();
                json!({"name": name, "vhost": vhost, "durable": true, "auto_delete": false,
                       "arguments": arguments})
            })
            .collect();
        bindings.sort();
        let bindings: Vec<Value> = bindings
            .into_iter()
            .map(|(source, destination, key)| {
                json!({"source": source, "vhost": vhost, "destination": destination,
                       "destination_type": "queue", "routing_key": key, "arguments": {}})
            })
            .collect();
        json!({
            "vhosts": [{"name": vhost}],
            "exchanges": exchanges,
            "queues": queues,
            "bindings": bindings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_parse_and_tiers_sort() {
        assert_eq!(parse_delay("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_delay("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_delay("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_delay("5"), None);
        assert_eq!(parse_delay("5d"), None);
        let settings = AmqpSettings {
            retry_tiers: vec!["30s".into(), "1s".into()],
            ..Default::default()
        };
        let topology = Topology::new(&settings).expect("valid");
        assert_eq!(topology.tier_for_retry(1).name, "1s");
        assert_eq!(topology.tier_for_retry(2).name, "30s");
        assert_eq!(topology.tier_for_retry(9).name, "30s");
        assert_eq!(topology.tier_for(Duration::from_secs(2)).name, "30s");
        assert_eq!(topology.tier_for(Duration::from_secs(90)).name, "30s");
        assert_eq!(topology.tier_at_most(Duration::from_secs(90)).name, "30s");
        assert_eq!(topology.tier_at_most(Duration::from_secs(10)).name, "1s");
        assert_eq!(topology.tier_at_most(Duration::from_millis(10)).name, "1s");
        let bad = AmqpSettings {
            retry_tiers: vec!["soon".into()],
            ..Default::default()
        };
        assert!(Topology::new(&bad).is_err());
    }

    #[test]
    fn lanes_have_their_own_queues_and_routing_keys() {
        let topology = Topology::new(&AmqpSettings::default()).expect("valid");
        let channel = channels::WECHAT_TEMPLATE;
        assert_eq!(
            topology.lane_queue(channel, Lane::Normal),
            "herald.send.wechat.template"
        );
        assert_eq!(
            topology.lane_queue(channel, Lane::Urgent),
            "herald.send.wechat.template.urgent"
        );
        assert_eq!(topology.lane_routing_key(channel, Lane::Normal), channel);
        assert_eq!(
            topology.lane_routing_key(channel, Lane::Bulk),
            "wechat.template.bulk"
        );
        assert_eq!(
            topology.lane_of_queue("herald.send.wechat.template.high"),
            Some((channel, Lane::High))
        );
        assert_eq!(topology.lane_of_queue("herald.render"), None);
        let described = topology.describe();
        for lane in Lane::ALL {
            assert!(
                described
                    .iter()
                    .any(|(q, _)| *q == topology.lane_queue(channel, lane)),
                "{lane:?} declared"
            );
        }
    }
}
