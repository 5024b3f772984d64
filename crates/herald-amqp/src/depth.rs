//! Queue depth gauges: what is waiting, sampled by the services that consume it.
//!
//! Every consumer samples its own queue and the dead-letter queue with passive declares, so a
//! backlog shows up in `herald_queue_depth{queue}` and parked messages in `herald_dlq_depth`
//! wherever a Herald service runs (several replicas report the same value; dashboards take the
//! max). A failed sample keeps the last value and tries again next time.

use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::Broker;

pub const QUEUE_DEPTH: &str = "herald_queue_depth";
pub const DLQ_DEPTH: &str = "herald_dlq_depth";
/// Time from Herald's publish of a message to a consumer taking it.
pub const QUEUE_LAG: &str = "herald_queue_lag_seconds";

/// Samples `queue` and the dead-letter queue every `broker`'s sample interval until `stop`.
pub(crate) fn spawn(broker: Broker, queue: String, stop: CancellationToken) {
    let every = broker.depth_sample_interval();
    if every.is_zero() {
        return;
    }
    let dead = broker.topology().dead_queue();
    tokio::spawn(async move {
        let mut channel: Option<Channel> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // A passive declare of a missing queue closes the channel: open a new one then.
            if !channel.as_ref().is_some_and(|c| c.status().connected()) {
                channel = broker.open_channel().await.ok();
            }
            let Some(open) = &channel else { continue };
            if let Some(depth) = depth(open, &queue).await {
                metrics::gauge!(QUEUE_DEPTH, "queue" => queue.clone()).set(depth);
            }
            if let Some(depth) = depth(open, &dead).await {
                metrics::gauge!(QUEUE_DEPTH, "queue" => dead.clone()).set(depth);
                metrics::gauge!(DLQ_DEPTH).set(depth);
            }
        }
    });
}

/// Messages ready in `queue` now: a passive declare, exact (unlike the management API's
/// sampled numbers). A missing queue is an error, and closes `channel`.
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, crate::AmqpError> {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await?;
    Ok(declared.message_count())
}

async fn depth(channel: &Channel, queue: &str) -> Option<f64> {
    match queue_depth(channel, queue).await {
        Ok(depth) => Some(f64::from(depth)),
        Err(error) => {
            tracing::debug!(queue, %error, "queue depth not sampled");
            None
        }
    }
}

/// `herald_queue_lag_seconds{queue}` for a message Herald published (it carries its publish
/// time) that comes straight from a publish, not out of a retry tier (whose wait is on purpose).
pub(crate) fn record_lag(queue: &str, headers: Option<&FieldTable>) {
    let fresh = headers.is_none_or(|h| !h.inner().contains_key("x-death"));
    let published = crate::header_i64(headers, herald_contract::headers::PUBLISHED_AT);
    if let (true, Some(published)) = (fresh, published) {
        let lag = Duration::from_millis(u64::try_from(now_ms() - published).unwrap_or(0));
        metrics::histogram!(QUEUE_LAG, "queue" => queue.to_string()).record(lag.as_secs_f64());
    }
}

/// Milliseconds since the Unix epoch (the `x-herald-published-at` clock).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
