//! The renderer's settings, its clock, and the scheduler that releases held-back jobs
//! (`send_at`, quiet hours) from Postgres when they are due.

use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_config::RedisSettings;
use herald_contract::Timestamp;
use herald_store::Store;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// `[renderer]` in herald.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RendererSettings {
    /// Where frequency caps and de-duplication keys live (shared by every replica).
    pub redis: RedisSettings,
    /// Recipients written per transaction when fanning a request out.
    pub fanout_batch: usize,
    /// Requests rendered at once (and held unacknowledged): each holds its whole recipient
    /// list in memory, so this, not `amqp.prefetch`, bounds the renderer with large fan-outs.
    pub in_flight: u16,
    /// Requests of the bulk render lane rendered at once: bulk-priority requests and those
    /// naming more than `bulk_fanout_threshold` recipients are moved there from the render
    /// queue, so an urgent request is never queued behind a campaign.
    pub bulk_in_flight: u16,
    /// More recipients than this in one request make it bulk-lane work whatever its priority.
    pub bulk_fanout_threshold: usize,
    /// Recipients rendered at once over all requests in flight (at least one batch): what
    /// bounds the renderer's memory when many large fan-outs arrive together.
    pub recipients_in_flight: usize,
    /// The most recipients one request may name.
    pub max_recipients: usize,
    /// The scheduler looks for due jobs at least this often (and sleeps until the next one
    /// otherwise): the bound on how late a scheduled job leaves.
    pub schedule_poll_ms: u64,
    /// Jobs released per scheduler round.
    pub schedule_batch: i64,
    /// On shutdown, how long requests in flight may take to finish before they are abandoned
    /// unacknowledged (the broker redelivers them); unset waits for them.
    pub drain_timeout_ms: Option<u64>,
    /// For tests: the renderer's clock (quiet hours, `send_at`, `expires_at`) reads this
    /// instead of the system clock.
    pub fixed_now: Option<DateTime<Utc>>,
}

impl Default for RendererSettings {
    fn default() -> Self {
        Self {
            redis: RedisSettings::default(),
            fanout_batch: 500,
            in_flight: 8,
            bulk_in_flight: 2,
            bulk_fanout_threshold: 100,
            recipients_in_flight: 2_000,
            max_recipients: MAX_RECIPIENTS,
            schedule_poll_ms: 250,
            schedule_batch: 500,
            drain_timeout_ms: None,
            fixed_now: None,
        }
    }
}

/// The default and documented limit of recipients per request.
pub use herald_contract::validate::MAX_RECIPIENTS;

impl RendererSettings {
    /// The renderer's "now".
    pub fn now(&self) -> DateTime<Utc> {
        self.fixed_now.unwrap_or_else(Utc::now)
    }
}

/// A proto timestamp as a time (`None` when unset or out of range).
pub fn time_of(timestamp: Option<&Timestamp>) -> Option<DateTime<Utc>> {
    let t = timestamp?;
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
}

/// Releases due scheduled jobs to the outbox until `stop`. Several renderers may run this at
/// once: rows are taken with `SKIP LOCKED`.
pub async fn run_scheduler(store: Store, settings: RendererSettings, stop: CancellationToken) {
    let poll = Duration::from_millis(settings.schedule_poll_ms.max(10));
    let batch = settings.schedule_batch.max(1);
    loop {
        let pause = match store.release_due_jobs(batch).await {
            Ok(released) if released >= batch as u64 => Duration::ZERO,
            Ok(released) => {
                if released > 0 {
                    tracing::debug!(released, "scheduled jobs released");
                }
                match store.next_scheduled_job().await {
                    Ok(Some(due)) => (due - Utc::now())
                        .to_std()
                        .unwrap_or_default()
                        // A due row another poller holds: do not spin on it.
                        .clamp(Duration::from_millis(10), poll),
                    Ok(None) => poll,
                    Err(error) => {
                        tracing::warn!(%error, "scheduler: next due job");
                        poll
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "scheduler round failed");
                poll * 4
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
