//! Scheduling, expiry and cancellation.
//!
//! A held-back job (`send_at`, quiet hours) waits in `scheduled_jobs` with its delivery in
//! `deferred`; [`Store::release_due_jobs`] moves due ones to the outbox in one statement
//! (`FOR UPDATE SKIP LOCKED`, so any number of pollers run), and the outbox relay publishes
//! them. Nothing lives in memory or in a broker TTL, so a schedule survives restarts.
//!
//! A cancelled message's pending deliveries (`queued`, `deferred`, `retrying`) end in
//! `expired` with error code `cancelled`: the state machine already treats `expired` as
//! terminal everywhere (sender claims, callbacks, aggregates), so no new state is needed and
//! the contract's `DeliveryState` stays as producers know it.

use chrono::{DateTime, Utc};
use herald_contract::v1::DeliveryState as S;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::deliveries::{Change, state_of};
use crate::state::transition_allowed;
use crate::{Store, StoreError};

/// The error code of deliveries ended by a cancellation.
pub const CANCELLED: &str = "cancelled";

/// What a cancellation did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Cancellation {
    pub id: Uuid,
    /// Pending deliveries that became `expired` (code `cancelled`).
    pub cancelled: usize,
    /// Deliveries already sending or settled, left alone.
    pub unaffected: usize,
    /// The message's state afterwards.
    pub state: String,
}

impl Store {
    /// Moves up to `limit` due scheduled jobs to the outbox; returns how many.
    pub async fn release_due_jobs(&self, limit: i64) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH due AS (
                    DELETE FROM scheduled_jobs WHERE delivery_id IN (
                        SELECT delivery_id FROM scheduled_jobs WHERE due_at <= now()
                        ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                    RETURNING *)
                 INSERT INTO outbox (exchange, routing_key, headers, body, mandatory, message_id,
                    priority)
                 SELECT exchange, routing_key, headers, body, true, delivery_id::text, priority
                 FROM due",
            )
            .await?;
        let released = client.execute(&statement, &[&limit]).await?;
        if released > 0 {
            self.outbox_written();
        }
        Ok(released)
    }

    /// When the earliest scheduled job is due, if any.
    pub async fn next_scheduled_job(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT min(due_at) FROM scheduled_jobs")
            .await?;
        Ok(client.query_one(&statement, &[]).await?.get(0))
    }

    /// Ends a delivery that was not sent in time as `expired` (the sender found its
    /// `expires_at` passed). Returns the state afterwards (unchanged if already settled).
    pub async fn expire_delivery(&self, id: Uuid, message: &str) -> Result<S, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = self
            .lock_delivery(&tx, id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("delivery {id}")))?;
        let from = state_of(row.get(4));
        if !transition_allowed(from, S::Expired) {
            tx.commit().await?;
            return Ok(from);
        }
        let update = tx
            .prepare_cached(
                "UPDATE deliveries SET state = 'expired', last_error_code = 'expired',
                    last_error = $2, updated_at = now() WHERE id = $1",
            )
            .await?;
        tx.execute(&update, &[&id, &message]).await?;
        let unschedule = tx
            .prepare_cached("DELETE FROM scheduled_jobs WHERE delivery_id = $1")
            .await?;
        tx.execute(&unschedule, &[&id]).await?;
        self.record_change(
            &tx,
            &row,
            &Change {
                to: S::Expired,
                source: "sender",
                detail: json!({ "reason": "expired", "message": message }),
                dedup_key: None,
                error_code: Some("expired"),
                error_message: Some(message),
                announce: true,
            },
        )
        .await?;
        tx.commit().await?;
        self.outbox_written();
        Ok(S::Expired)
    }

    /// Marks a message that expired before it was rendered (no deliveries were made).
    pub async fn expire_message(&self, id: Uuid, error: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE messages SET state = 'expired', error = $2, updated_at = now()
                 WHERE id = $1 AND state = 'accepted'",
            )
            .await?;
        client.execute(&statement, &[&id, &error]).await?;
        Ok(())
    }

    /// Cancels `tenant`'s message `id`: no more deliveries are written for it, and its
    /// pending ones end as `expired` with code `cancelled` (their held-back jobs are deleted;
    /// a job already queued finds its delivery settled and is dropped by the sender).
    /// Deliveries already sending or settled are left alone. `None`: no such message.
    pub async fn cancel_message(
        &self,
        tenant: &str,
        id: Uuid,
    ) -> Result<Option<Cancellation>, StoreError> {
        // First, on its own: the renderer checks this under the same row lock before every
        // batch, so no delivery is written after this commits. (Its connection goes back to
        // the pool at the end of the block, before the transaction below takes one.)
        let found = {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(
                    "UPDATE messages SET cancelled_at = COALESCE(cancelled_at, now()),
                        state = CASE WHEN state = 'accepted' THEN 'cancelled' ELSE state END,
                        updated_at = now()
                     WHERE id = $1 AND tenant_id = $2",
                )
                .await?;
            client.execute(&statement, &[&id, &tenant]).await?
        };
        if found == 0 {
            return Ok(None);
        }
        let trace_id = herald_telemetry::current_trace_id();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Delivery rows first, then the message row (in shift_counts): the order every
        // writer uses, so a cancellation never deadlocks with a sender.
        let lock_pending = tx
            .prepare_cached(
                "SELECT id, channel, state FROM deliveries
                 WHERE message_id = $1 AND state IN ('queued', 'deferred', 'retrying')
                 ORDER BY id FOR UPDATE",
            )
            .await?;
        let pending = tx.query(&lock_pending, &[&id]).await?;
        let ids: Vec<Uuid> = pending.iter().map(|r| r.get(0)).collect();
        let detail = "the message was cancelled";
        if !ids.is_empty() {
            let expire = tx
                .prepare_cached(
                    "UPDATE deliveries SET state = 'expired', last_error_code = $2, last_error = $3,
                        updated_at = now() WHERE id = ANY($1)",
                )
                .await?;
            tx.execute(&expire, &[&ids, &CANCELLED, &detail]).await?;
            let history = tx
                .prepare_cached(
                    "INSERT INTO delivery_events (delivery_id, state, source, detail, trace_id)
                     SELECT u.id, 'expired', 'api', $2, $3 FROM UNNEST($1::uuid[]) AS u(id)",
                )
                .await?;
            tx.execute(
                &history,
                &[
                    &ids,
                    &json!({ "reason": CANCELLED, "message": detail }),
                    &trace_id,
                ],
            )
            .await?;
            let unschedule = tx
                .prepare_cached("DELETE FROM scheduled_jobs WHERE message_id = $1")
                .await?;
            tx.execute(&unschedule, &[&id]).await?;
        }
        let mut deltas = vec![(S::Expired, ids.len() as i64)];
        let mut announcements = Vec::with_capacity(pending.len());
        for row in &pending {
            deltas.push((state_of(row.get(2)), -1));
            announcements.push(self.status_message(
                row.get(0),
                id,
                tenant,
                row.get(1),
                S::Expired,
                Some(CANCELLED),
                Some(detail),
            ));
        }
        Self::insert_outbox_many(&tx, &announcements, &[]).await?;
        self.shift_counts(&tx, id, &deltas).await?;
        let outcome = tx
            .prepare_cached(
                "SELECT m.state, (SELECT count(*) FROM deliveries d WHERE d.message_id = m.id)
                 FROM messages m WHERE m.id = $1",
            )
            .await?;
        let row = tx.query_one(&outcome, &[&id]).await?;
        tx.commit().await?;
        if !announcements.is_empty() {
            self.outbox_written();
        }
        let total: i64 = row.get(1);
        Ok(Some(Cancellation {
            id,
            cancelled: ids.len(),
            unaffected: usize::try_from(total)
                .unwrap_or(0)
                .saturating_sub(ids.len()),
            state: row.get(0),
        }))
    }
}
