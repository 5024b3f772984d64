//! The status projector: applies normalised provider events to the delivery state machine and
//! the recipient directory, and bounds the wait of events that arrived before their send result.

use std::time::Duration;

use herald_amqp::{Broker, Delivery, Disposition};
use herald_contract::decode_json;
use herald_contract::headers::TRACEPARENT;
use herald_contract::v1::{DeliveryEvent, RecipientEvent};
use herald_store::{ProviderEventOutcome, RecipientEventOutcome, Store};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::wechat::mask;
use crate::{EVENT_TYPE_HEADER, RECIPIENT_EVENT};

/// Applies provider events until `shutdown`.
pub async fn run_projector(
    broker: Broker,
    store: Store,
    prefetch: u16,
    shutdown: CancellationToken,
) -> Result<(), herald_amqp::AmqpError> {
    let queue = broker.topology().projector_queue();
    let consumer = broker.consume(&queue, "herald-projector").await?;
    tracing::info!(%queue, "status projector consuming");
    consumer
        .run(
            broker.clone(),
            usize::from(prefetch),
            shutdown,
            move |delivery| {
                let (store, queue) = (store.clone(), queue.clone());
                async move { project(&store, &queue, &delivery).await }
            },
        )
        .await
}

async fn project(store: &Store, queue: &str, delivery: &Delivery) -> Disposition {
    let kind = herald_amqp::header_str(delivery.properties.headers().as_ref(), EVENT_TYPE_HEADER);
    if kind == Some(RECIPIENT_EVENT) {
        return project_recipient(store, queue, delivery).await;
    }
    let event: DeliveryEvent = match decode_json(&delivery.data) {
        Ok(event) => event,
        Err(e) => {
            return Disposition::DeadLetter {
                reason: "decode_error",
                detail: e.to_string(),
            };
        }
    };
    let span = herald_amqp::trace::consumer_span(queue, delivery);
    span.record("herald.provider_msgid", event.provider_msgid.as_str());
    span.record("herald.state", event.state().name());
    // The receiver continues the send's trace when the delivery is known by then. A callback
    // that beat the send result could not; if the result is stored now, the projection joins
    // the delivery's trace itself, so its history row stays in the message's trace. (Set
    // before the span is first entered.)
    if let Ok(Some(stored)) = store
        .traceparent_for_msgid(&event.provider_account, &event.provider_msgid)
        .await
    {
        let headers = delivery.properties.headers().clone();
        let carried = herald_amqp::header_str(headers.as_ref(), TRACEPARENT)
            .and_then(herald_telemetry::trace_id_of);
        if carried != herald_telemetry::trace_id_of(&stored) {
            herald_telemetry::set_parent_traceparent(&span, &stored);
        }
    }
    async {
        match store.apply_provider_event(&event).await {
            Ok(outcome) => {
                if outcome == ProviderEventOutcome::Pending {
                    tracing::info!("event before its send result; kept until the result is stored");
                } else {
                    tracing::debug!(?outcome, "event projected");
                }
                Disposition::Ack
            }
            Err(e) => Disposition::Requeue {
                error: e.to_string(),
            },
        }
    }
    .instrument(span)
    .await
}

async fn project_recipient(store: &Store, queue: &str, delivery: &Delivery) -> Disposition {
    let event: RecipientEvent = match decode_json(&delivery.data) {
        Ok(event) => event,
        Err(e) => {
            return Disposition::DeadLetter {
                reason: "decode_error",
                detail: e.to_string(),
            };
        }
    };
    let span = herald_amqp::trace::consumer_span(queue, delivery);
    async {
        match store.apply_recipient_event(&event).await {
            Ok(outcome) => {
                let level_info = matches!(outcome, RecipientEventOutcome::Applied);
                if level_info {
                    tracing::info!(
                        account = %event.provider_account,
                        recipient = %mask(&event.recipient),
                        kind = %event.kind,
                        "recipient event applied"
                    );
                } else {
                    tracing::debug!(?outcome, kind = %event.kind, "recipient event projected");
                }
                Disposition::Ack
            }
            Err(e) => Disposition::Requeue {
                error: e.to_string(),
            },
        }
    }
    .instrument(span)
    .await
}

/// Every `interval`, parks the provider events that have waited longer than `max_age` for
/// their send result (dead-letter reason `unmatched_event`), until `shutdown`.
pub async fn run_pending_sweep(
    store: Store,
    dead_letter_exchange: String,
    queue: String,
    max_age: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(50)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        loop {
            match store
                .expire_pending_provider_events(max_age, &dead_letter_exchange, &queue)
                .await
            {
                Ok(expired) if expired.is_empty() => break,
                Ok(expired) => {
                    for event in &expired {
                        tracing::warn!(
                            account = %event.provider_account,
                            provider_msgid = %event.provider_msgid,
                            received_at = %event.received_at,
                            "provider event never matched a delivery; parked as unmatched_event"
                        );
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "pending event sweep failed; trying again later");
                    break;
                }
            }
        }
    }
}
