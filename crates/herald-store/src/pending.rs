//! The bound on provider events that wait for their send result: an event whose delivery is
//! still unknown after the configured age is taken out of `pending_provider_events` and parked
//! in the dead-letter exchange (through the outbox, in the same transaction, so it is reported
//! exactly when it leaves the table and never lost).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_contract::headers;

use crate::outbox::OutboxMessage;
use crate::{Store, StoreError};

/// Rows taken per sweep round.
const SWEEP_BATCH: i64 = 500;
/// The dead-letter reason of an event that never found its delivery.
pub const UNMATCHED_EVENT: &str = "unmatched_event";

/// An event the sweep gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredProviderEvent {
    pub provider_account: String,
    pub provider_msgid: String,
    pub event_id: String,
    pub received_at: DateTime<Utc>,
}

impl Store {
    /// Parks (in `dead_letter_exchange`, reason [`UNMATCHED_EVENT`]) up to one batch of pending
    /// provider events received more than `max_age` ago, and returns them. `queue` names where
    /// they were consumed from (the projector's queue) in the dead-letter headers.
    pub async fn expire_pending_provider_events(
        &self,
        max_age: Duration,
        dead_letter_exchange: &str,
        queue: &str,
    ) -> Result<Vec<ExpiredProviderEvent>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let statement = tx
            .prepare_cached(
                "DELETE FROM pending_provider_events
                 WHERE (provider_account, provider_msgid, event_id) IN (
                     SELECT provider_account, provider_msgid, event_id FROM pending_provider_events
                     WHERE received_at < now() - make_interval(secs => $1)
                     ORDER BY received_at LIMIT $2 FOR UPDATE SKIP LOCKED)
                 RETURNING provider_account, provider_msgid, event_id, event, received_at",
            )
            .await?;
        let rows = tx
            .query(&statement, &[&max_age.as_secs_f64(), &SWEEP_BATCH])
            .await?;
        let mut expired = Vec::with_capacity(rows.len());
        for row in &rows {
            let event: serde_json::Value = row.get(3);
            let provider = event["provider"].as_str().unwrap_or("unknown");
            let kind = event["kind"]
                .as_str()
                .unwrap_or("event")
                .to_ascii_lowercase();
            let item = ExpiredProviderEvent {
                provider_account: row.get(0),
                provider_msgid: row.get(1),
                event_id: row.get(2),
                received_at: row.get(4),
            };
            let detail = format!(
                "no delivery of account `{}` has provider msgid `{}` after waiting {}s",
                item.provider_account,
                item.provider_msgid,
                max_age.as_secs()
            );
            Self::insert_outbox(
                &tx,
                &OutboxMessage {
                    exchange: dead_letter_exchange.to_string(),
                    routing_key: format!("{provider}.{kind}"),
                    headers: BTreeMap::from([
                        (
                            headers::DEAD_REASON.to_string(),
                            UNMATCHED_EVENT.to_string(),
                        ),
                        (headers::DEAD_DETAIL.to_string(), detail),
                        (headers::DEAD_QUEUE.to_string(), queue.to_string()),
                    ]),
                    body: serde_json::to_vec(&event).unwrap_or_default(),
                    routing: herald_amqp::Routing::Required,
                },
            )
            .await?;
            expired.push(item);
        }
        tx.commit().await?;
        if !expired.is_empty() {
            self.outbox_written();
        }
        Ok(expired)
    }

    /// How many provider events wait for their send result, and the age of the oldest.
    pub async fn pending_provider_events(
        &self,
    ) -> Result<(i64, Option<DateTime<Utc>>), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT count(*), min(received_at) FROM pending_provider_events")
            .await?;
        let row = client.query_one(&statement, &[]).await?;
        Ok((row.get(0), row.get(1)))
    }
}
