//! The consume loop every Herald worker uses: bounded concurrency, an explicit disposition for
//! each message, dead letters with reasons, and a graceful stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{AmqpError, Broker, Consumer, Delivery, dead_letter};

/// What to do with a message once its handler is done with it.
#[derive(Debug)]
pub enum Disposition {
    /// The outcome is durable: acknowledge.
    Ack,
    /// Undecodable or unprocessable for good: park it with a reason, then acknowledge.
    DeadLetter {
        reason: &'static str,
        detail: String,
    },
    /// A transient failure (database or broker away): tried again in place after a pause,
    /// for up to a minute, then given back. The queue's delivery limit parks a message that
    /// keeps failing.
    Requeue { error: String },
}

impl Disposition {
    fn label(&self) -> &'static str {
        match self {
            Disposition::Ack => "ack",
            Disposition::DeadLetter { .. } => "dead_letter",
            Disposition::Requeue { .. } => "requeue",
        }
    }
}

/// The pipeline stage a queue feeds (`render`, `send`, `project`, ...), for metric labels
/// that stay few whatever the prefix and channels.
fn stage_of(prefix: &str, queue: &str) -> &'static str {
    let name = queue
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(queue);
    match name.split('.').next().unwrap_or_default() {
        "render" => "render",
        "send" => "send",
        "projector" => "project",
        "webhooks" => "webhook",
        _ => "other",
    }
}

/// Pause before giving a message back after a transient failure, so an outage does not spin.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);
/// How long a worker keeps trying a message that failed transiently before giving it back.
/// Every requeue counts against the quorum queue's `x-delivery-limit` (5 by default), which is
/// meant for messages that crash their consumer: requeued once a second, a good request was
/// parked as `delivery_limit` after a Postgres restart of five seconds (found by the fault
/// suite, `tests/e2e/fault.rs`). Tried again in place, a message uses one delivery per window,
/// so only an outage of several windows parks it.
const TRANSIENT_RETRY_WINDOW: Duration = Duration::from_secs(60);

impl Consumer {
    /// Runs `handler` on each delivery, at most `concurrency` at once, until `shutdown`; then
    /// stops taking deliveries and waits for the ones in flight. Returns an error if the
    /// subscription ends any other way (connection lost for good, queue deleted), so the
    /// process exits and is restarted rather than idling without consuming.
    pub async fn run<H, Fut>(
        mut self,
        broker: Broker,
        concurrency: usize,
        shutdown: CancellationToken,
        handler: H,
    ) -> Result<(), AmqpError>
    where
        H: Fn(Arc<Delivery>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Disposition> + Send + 'static,
    {
        let sampling = shutdown.child_token();
        crate::depth::spawn(broker.clone(), self.queue().to_string(), sampling.clone());
        let _stop_sampling = sampling.drop_guard();
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let mut tasks = JoinSet::new();
        let mut ended = Ok(());
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = self.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => Arc::new(delivery),
                Some(Err(error)) => {
                    tracing::error!(queue = %self.queue(), %error, "consumer failed");
                    ended = Err(error);
                    break;
                }
                None => {
                    tracing::error!(queue = %self.queue(), "consumer cancelled by the broker");
                    ended = Err(AmqpError::Cancelled(self.queue().to_string()));
                    break;
                }
            };
            let handler = handler.clone();
            let broker = broker.clone();
            let queue = self.queue().to_string();
            let stopping = shutdown.clone();
            // The channel the message came on, and will be acked on.
            let consuming = self.channel.clone();
            crate::depth::record_lag(&queue, delivery.properties.headers().as_ref());
            tasks.spawn(async move {
                let started = std::time::Instant::now();
                let mut disposition = handler(delivery.clone()).await;
                // A transient failure is tried again here, holding the message (and its
                // permit: an outage slows intake instead of spinning), until it passes, the
                // window ends, the connection drops or the worker stops; only then is it
                // given back.
                let give_up_at = tokio::time::Instant::now() + TRANSIENT_RETRY_WINDOW;
                while let Disposition::Requeue { error } = &disposition {
                    // With its channel or the connection gone the message is the broker's
                    // again (and a publish failing for that reason will not pass): stop, so
                    // the consumer sees the loss and the worker reconnects.
                    if tokio::time::Instant::now() + REQUEUE_PAUSE > give_up_at
                        || !broker.is_connected()
                        || !consuming.status().connected()
                    {
                        break;
                    }
                    tracing::warn!(%error, queue, "transient failure; trying again");
                    tokio::select! {
                        _ = stopping.cancelled() => break,
                        _ = tokio::time::sleep(REQUEUE_PAUSE) => {}
                    }
                    disposition = handler(delivery.clone()).await;
                }
                let stage = stage_of(broker.topology().prefix(), &queue);
                metrics::histogram!("herald_stage_duration_seconds", "stage" => stage)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!(
                    "herald_consumer_messages_total",
                    "queue" => queue.clone(),
                    "disposition" => disposition.label(),
                )
                .increment(1);
                settle(&broker, &queue, &delivery, disposition).await;
                drop(permit);
            });
            // Reap finished tasks so the set does not grow.
            while tasks.try_join_next().is_some() {}
        }
        let drained = async { while tasks.join_next().await.is_some() {} };
        match self.drain_timeout {
            None => drained.await,
            Some(timeout) => {
                if tokio::time::timeout(timeout, drained).await.is_err() {
                    tracing::warn!(
                        queue = %self.queue(),
                        in_flight = tasks.len(),
                        "drain timeout: aborting the deliveries still in flight (the broker redelivers them)"
                    );
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                }
            }
        }
        ended
    }
}

async fn settle(broker: &Broker, queue: &str, delivery: &Delivery, disposition: Disposition) {
    let result = match disposition {
        Disposition::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
        Disposition::DeadLetter { reason, detail } => {
            match dead_letter(
                &broker.publisher(),
                broker.topology(),
                delivery,
                queue,
                reason,
                &detail,
            )
            .await
            {
                Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
                Err(error) => {
                    // Not parked: give it back rather than lose it.
                    tracing::error!(%error, queue, "could not dead-letter; requeueing");
                    requeue(delivery).await
                }
            }
        }
        Disposition::Requeue { error } => {
            tracing::warn!(%error, queue, "transient failure; requeueing");
            requeue(delivery).await
        }
    };
    if let Err(error) = result {
        // The channel is gone: the broker redelivers the message to another consumer.
        tracing::warn!(%error, queue, "could not settle message; the broker will redeliver it");
    }
}

/// Gives a message back to its queue after a pause (so an outage does not spin).
async fn requeue(delivery: &Delivery) -> lapin::Result<bool> {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
}
