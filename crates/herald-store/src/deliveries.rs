//! Delivery rows and their state machine.

use std::collections::BTreeMap;

use herald_contract::v1::{DeliveryEvent, DeliveryState as S, StatusEvent};
use herald_contract::{SCHEMA_VERSION, Timestamp, encode_json, headers};
use serde_json::json;
use uuid::Uuid;

use crate::messages::NewDelivery;
use crate::outbox::{OutboxJob, OutboxMessage};
use crate::state::{aggregate_counts, transition_allowed};
use crate::{Store, StoreError};

// Deferrals, delivery age and operator reopening (sender and DLQ tools).
mod sending;

/// What a sender learns when it claims a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Go ahead: this is attempt `attempt` (1-based).
    Claimed { attempt: i32 },
    /// The delivery already has an outcome; ack the job without sending.
    Finished(S),
    /// No such delivery (the job outlived its data).
    Missing,
}

/// The result of a send attempt, stored before the job is acked.
#[derive(Debug, Clone)]
pub enum Outcome {
    Sent {
        provider_msgid: String,
    },
    /// Will be tried again from a retry tier.
    Retrying {
        code: String,
        message: String,
        retry_in: String,
    },
    Failed {
        code: String,
        message: String,
        /// The next channel for this recipient, queued in the same transaction.
        fallback: Option<Box<Fallback>>,
    },
}

/// The next step of a fallback chain: its delivery row and its job.
#[derive(Debug, Clone)]
pub struct Fallback {
    pub delivery: NewDelivery,
    pub job: OutboxJob,
}

/// What happened to a provider event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderEventOutcome {
    Applied,
    /// Seen before (callbacks are retried by providers).
    Duplicate,
    /// The delivery is already in a later state (a late or out-of-order event).
    Stale,
    /// The send result naming this msgid is not stored yet; kept until it is.
    Pending,
}

/// A delivery as a sender sees it.
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub id: Uuid,
    pub message_id: Uuid,
    pub tenant_id: String,
    pub channel: String,
    pub state: S,
    pub attempt: i32,
    pub traceparent: Option<String>,
}

pub(crate) struct Change<'a> {
    pub(crate) to: S,
    pub(crate) source: &'a str,
    pub(crate) detail: serde_json::Value,
    pub(crate) dedup_key: Option<&'a str>,
    pub(crate) error_code: Option<&'a str>,
    pub(crate) error_message: Option<&'a str>,
    /// Whether producers hear about it (they do not for `sending`).
    pub(crate) announce: bool,
}

pub(crate) fn state_of(name: &str) -> S {
    S::from_name(name).unwrap_or(S::Unspecified)
}

/// Advisory-lock key for one provider message: serialises "store the send result" against
/// "a callback for it arrived", so an early callback is either seen by the sender's
/// transaction or finds the delivery itself.
fn msgid_lock_key(account: &str, msgid: &str) -> String {
    format!("{account}\u{1f}{msgid}")
}

impl Store {
    /// Creates the deliveries of a rendered message (idempotent by delivery id) and marks the
    /// message rendered.
    pub async fn create_deliveries(
        &self,
        message_id: Uuid,
        tenant: &str,
        deliveries: &[NewDelivery],
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut created = 0;
        for d in deliveries {
            if self
                .insert_queued(&tx, message_id, tenant, d, "renderer", json!({}))
                .await?
            {
                created += 1;
            }
        }
        self.shift_counts(&tx, message_id, &[(S::Queued, created)])
            .await?;
        tx.commit().await?;
        self.outbox_written();
        Ok(())
    }

    /// The delivery with this id.
    pub async fn delivery(&self, id: Uuid) -> Result<Option<DeliveryRecord>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, message_id, tenant_id, channel, state, attempt, traceparent
                 FROM deliveries WHERE id = $1",
            )
            .await?;
        let row = client.query_opt(&statement, &[&id]).await?;
        Ok(row.map(|r| DeliveryRecord {
            id: r.get(0),
            message_id: r.get(1),
            tenant_id: r.get(2),
            channel: r.get(3),
            state: state_of(r.get(4)),
            attempt: r.get(5),
            traceparent: r.get(6),
        }))
    }

    /// Claims a delivery for a send attempt. A job redelivered after a crash finds `sending`
    /// and claims again (the provider de-duplicates by client_msg_id); one that already has
    /// an outcome is reported finished.
    pub async fn claim_delivery(&self, id: Uuid) -> Result<Claim, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(row) = self.lock_delivery(&tx, id).await? else {
            return Ok(Claim::Missing);
        };
        let from = state_of(row.get(4));
        if !transition_allowed(from, S::Sending) {
            return Ok(Claim::Finished(from));
        }
        let claim = tx
            .prepare_cached(
                "UPDATE deliveries SET state = 'sending', attempt = attempt + 1, updated_at = now()
                 WHERE id = $1 RETURNING attempt",
            )
            .await?;
        let attempt: i32 = tx.query_one(&claim, &[&id]).await?.get(0);
        self.record_change(
            &tx,
            &row,
            &Change {
                to: S::Sending,
                source: "sender",
                detail: json!({ "attempt": attempt }),
                dedup_key: None,
                error_code: None,
                error_message: None,
                announce: false,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(Claim::Claimed { attempt })
    }

    /// Stores the outcome of a send attempt (and applies any provider event that arrived for
    /// its msgid before this result did).
    pub async fn record_outcome(&self, id: Uuid, outcome: &Outcome) -> Result<S, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = self
            .lock_delivery(&tx, id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("delivery {id}")))?;
        let from = state_of(row.get(4));
        let account: String = row.get(5);
        let (to, code, message, detail) = match outcome {
            Outcome::Sent { provider_msgid } => (
                S::Sent,
                None,
                None,
                json!({ "provider_msgid": provider_msgid }),
            ),
            Outcome::Retrying {
                code,
                message,
                retry_in,
            } => (
                S::Retrying,
                Some(code.as_str()),
                Some(message.as_str()),
                json!({ "code": code, "message": message, "retry_in": retry_in }),
            ),
            Outcome::Failed { code, message, .. } => (
                S::Failed,
                Some(code.as_str()),
                Some(message.as_str()),
                json!({ "code": code, "message": message }),
            ),
        };
        if !transition_allowed(from, to) {
            tx.commit().await?;
            return Ok(from);
        }
        let msgid = match outcome {
            Outcome::Sent { provider_msgid } => {
                // Serialises with a callback for this msgid (see msgid_lock_key); taken before
                // the message row is locked, to hold that lock as briefly as possible.
                let lock = tx
                    .prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .await?;
                tx.execute(&lock, &[&msgid_lock_key(&account, provider_msgid)])
                    .await?;
                Some(provider_msgid.as_str())
            }
            _ => None,
        };
        let update = tx
            .prepare_cached(
                "UPDATE deliveries SET state = $2, last_error_code = COALESCE($3, last_error_code),
                    last_error = COALESCE($4, last_error),
                    provider_msgid = COALESCE($5, provider_msgid), updated_at = now()
                 WHERE id = $1",
            )
            .await?;
        tx.execute(&update, &[&id, &to.name(), &code, &message, &msgid])
            .await?;
        self.record_change(
            &tx,
            &row,
            &Change {
                to,
                source: "sender",
                detail,
                dedup_key: None,
                error_code: code,
                error_message: message,
                announce: true,
            },
        )
        .await?;
        if let Outcome::Failed {
            code,
            fallback: Some(next),
            ..
        } = outcome
        {
            self.queue_fallback(&tx, &row, code, next).await?;
        }
        let mut state = to;
        if let Some(provider_msgid) = msgid {
            let take_pending = tx
                .prepare_cached(
                    "DELETE FROM pending_provider_events
                     WHERE provider_account = $1 AND provider_msgid = $2
                     RETURNING event",
                )
                .await?;
            let pending = tx
                .query(&take_pending, &[&account, &provider_msgid])
                .await?;
            for event in pending {
                let event: serde_json::Value = event.get(0);
                let Ok(event) = serde_json::from_value::<DeliveryEvent>(event) else {
                    continue;
                };
                if let Some(applied) = self.apply_event_locked(&tx, id, &event).await? {
                    state = applied;
                }
            }
        }
        tx.commit().await?;
        self.outbox_written();
        Ok(state)
    }

    /// The stored trace context of the delivery a provider msgid belongs to (so the callback's
    /// processing continues the send's trace).
    pub async fn traceparent_for_msgid(
        &self,
        account: &str,
        msgid: &str,
    ) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT traceparent FROM deliveries WHERE provider_account = $1 AND provider_msgid = $2",
            )
            .await?;
        let row = client.query_opt(&statement, &[&account, &msgid]).await?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// Applies a normalised provider event. If its delivery is not known yet (the callback
    /// beat the send result), the event is kept and applied when the result is stored.
    pub async fn apply_provider_event(
        &self,
        event: &DeliveryEvent,
    ) -> Result<ProviderEventOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let seen = tx
            .prepare_cached("SELECT 1 FROM delivery_events WHERE dedup_key = $1")
            .await?;
        if tx.query_opt(&seen, &[&event.event_id]).await?.is_some() {
            return Ok(ProviderEventOutcome::Duplicate);
        }
        let lock = tx
            .prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .await?;
        tx.execute(
            &lock,
            &[&msgid_lock_key(
                &event.provider_account,
                &event.provider_msgid,
            )],
        )
        .await?;
        let find = tx
            .prepare_cached(
                "SELECT id FROM deliveries WHERE provider_account = $1 AND provider_msgid = $2",
            )
            .await?;
        let delivery = tx
            .query_opt(&find, &[&event.provider_account, &event.provider_msgid])
            .await?;
        let outcome = match delivery {
            None => {
                let json = serde_json::to_value(event).unwrap_or_default();
                let keep = tx
                    .prepare_cached(
                        "INSERT INTO pending_provider_events
                            (provider_account, provider_msgid, event_id, event)
                         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    )
                    .await?;
                tx.execute(
                    &keep,
                    &[
                        &event.provider_account,
                        &event.provider_msgid,
                        &event.event_id,
                        &json,
                    ],
                )
                .await?;
                ProviderEventOutcome::Pending
            }
            Some(row) => match self.apply_event_locked(&tx, row.get(0), event).await? {
                Some(_) => ProviderEventOutcome::Applied,
                None => ProviderEventOutcome::Stale,
            },
        };
        tx.commit().await?;
        self.outbox_written();
        Ok(outcome)
    }

    async fn apply_event_locked(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        delivery_id: Uuid,
        event: &DeliveryEvent,
    ) -> Result<Option<S>, StoreError> {
        let Some(row) = self.lock_delivery(tx, delivery_id).await? else {
            return Ok(None);
        };
        let from = state_of(row.get(4));
        let to = event.state();
        if !transition_allowed(from, to) {
            return Ok(None);
        }
        let failed = to == S::Failed;
        let code = failed.then_some(event.provider_status.as_str());
        let update = tx
            .prepare_cached(
                "UPDATE deliveries SET state = $2, last_error_code = COALESCE($3, last_error_code),
                    last_error = COALESCE($3, last_error), updated_at = now() WHERE id = $1",
            )
            .await?;
        tx.execute(&update, &[&delivery_id, &to.name(), &code])
            .await?;
        self.record_change(
            tx,
            &row,
            &Change {
                to,
                source: "callback",
                detail: json!({
                    "event": event.kind,
                    "provider_status": event.provider_status,
                    "provider_msgid": event.provider_msgid,
                }),
                dedup_key: Some(&event.event_id),
                error_code: code,
                error_message: code,
                announce: true,
            },
        )
        .await?;
        Ok(Some(to))
    }

    /// Row: id, message_id, tenant_id, channel, state, provider_account.
    /// Inserts a `queued` delivery with its first history entry and its status event, unless
    /// it exists (ids are deterministic); `true` when inserted. The caller shifts the counts.
    async fn insert_queued(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        message_id: Uuid,
        tenant: &str,
        d: &NewDelivery,
        source: &str,
        detail: serde_json::Value,
    ) -> Result<bool, StoreError> {
        let insert = tx
            .prepare_cached(
                "INSERT INTO deliveries (id, message_id, tenant_id, channel, provider_account,
                    recipient, state, traceparent)
                 VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7)
                 ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .await?;
        let inserted = tx
            .query_opt(
                &insert,
                &[
                    &d.id,
                    &message_id,
                    &tenant,
                    &d.channel,
                    &d.provider_account,
                    &d.recipient,
                    &herald_telemetry::current_traceparent(),
                ],
            )
            .await?;
        if inserted.is_none() {
            return Ok(false);
        }
        let history = tx
            .prepare_cached(
                "INSERT INTO delivery_events (delivery_id, state, source, detail, trace_id)
                 VALUES ($1, 'queued', $2, $3, $4)",
            )
            .await?;
        tx.execute(
            &history,
            &[
                &d.id,
                &source,
                &detail,
                &herald_telemetry::current_trace_id(),
            ],
        )
        .await?;
        self.announce(
            tx,
            d.id,
            message_id,
            tenant,
            &d.channel,
            S::Queued,
            None,
            None,
        )
        .await?;
        Ok(true)
    }

    /// Queues the next channel of a failed delivery's fallback chain (idempotent by the
    /// step's delivery id: a failure recorded twice queues it once).
    async fn queue_fallback(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        failed: &tokio_postgres::Row,
        code: &str,
        next: &Fallback,
    ) -> Result<(), StoreError> {
        let failed_id: Uuid = failed.get(0);
        let message_id: Uuid = failed.get(1);
        let tenant: String = failed.get(2);
        let detail = json!({ "after": failed_id, "code": code });
        if !self
            .insert_queued(tx, message_id, &tenant, &next.delivery, "fallback", detail)
            .await?
        {
            return Ok(());
        }
        self.shift_counts(tx, message_id, &[(S::Queued, 1)]).await?;
        Self::insert_outbox_many(tx, &[], std::slice::from_ref(&next.job)).await?;
        Ok(())
    }

    pub(crate) async fn lock_delivery(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        id: Uuid,
    ) -> Result<Option<tokio_postgres::Row>, StoreError> {
        // Prepared once per pooled connection (deadpool's statement cache), like the other
        // statements of the per-send transactions: parsing and planning each time was a
        // large share of Postgres' CPU per notification (docs/benchmarks.md).
        let statement = tx
            .prepare_cached(
                "SELECT id, message_id, tenant_id, channel, state, provider_account
                 FROM deliveries WHERE id = $1 FOR UPDATE",
            )
            .await?;
        Ok(tx.query_opt(&statement, &[&id]).await?)
    }

    pub(crate) async fn record_change(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        row: &tokio_postgres::Row,
        change: &Change<'_>,
    ) -> Result<(), StoreError> {
        let delivery_id: Uuid = row.get(0);
        let message_id: Uuid = row.get(1);
        let tenant: String = row.get(2);
        let channel: String = row.get(3);
        let from = state_of(row.get(4));
        let statement = tx
            .prepare_cached(
                "INSERT INTO delivery_events (delivery_id, state, source, detail, trace_id, dedup_key)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await?;
        tx.execute(
            &statement,
            &[
                &delivery_id,
                &change.to.name(),
                &change.source,
                &change.detail,
                &herald_telemetry::current_trace_id(),
                &change.dedup_key,
            ],
        )
        .await?;
        if change.announce {
            self.announce(
                tx,
                delivery_id,
                message_id,
                &tenant,
                &channel,
                change.to,
                change.error_code,
                change.error_message,
            )
            .await?;
        }
        self.shift_counts(tx, message_id, &[(from, -1), (change.to, 1)])
            .await
    }

    /// Queues the producer-facing status event (`status.<tenant>.<state>`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn announce(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        delivery_id: Uuid,
        message_id: Uuid,
        tenant: &str,
        channel: &str,
        state: S,
        error_code: Option<&str>,
        error_message: Option<&str>,
    ) -> Result<(), StoreError> {
        let message = self.status_message(
            delivery_id,
            message_id,
            tenant,
            channel,
            state,
            error_code,
            error_message,
        );
        Self::insert_outbox(tx, &message).await
    }

    /// The producer-facing status event of a change, as an outbox message.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn status_message(
        &self,
        delivery_id: Uuid,
        message_id: Uuid,
        tenant: &str,
        channel: &str,
        state: S,
        error_code: Option<&str>,
        error_message: Option<&str>,
    ) -> OutboxMessage {
        let now = chrono::Utc::now();
        let event = StatusEvent {
            message_id: message_id.to_string(),
            delivery_id: delivery_id.to_string(),
            tenant: tenant.to_string(),
            channel: channel.to_string(),
            state: state as i32,
            error_code: error_code.unwrap_or_default().to_string(),
            error_message: error_message.unwrap_or_default().to_string(),
            at: Some(Timestamp {
                seconds: now.timestamp(),
                nanos: i32::try_from(now.timestamp_subsec_nanos()).unwrap_or(0),
            }),
            metadata: Default::default(),
        };
        let mut header_map = BTreeMap::from([(
            headers::SCHEMA_VERSION.to_string(),
            SCHEMA_VERSION.to_string(),
        )]);
        if let Some(traceparent) = herald_telemetry::current_traceparent() {
            header_map.insert(headers::TRACEPARENT.to_string(), traceparent);
        }
        OutboxMessage {
            exchange: self.status_exchange.to_string(),
            routing_key: format!("status.{tenant}.{}", state.name()),
            headers: header_map,
            body: encode_json(&event),
            // Producers bind to status when they want it; nobody listening is normal.
            routing: herald_amqp::Routing::Optional,
        }
    }

    /// Moves `message_id`'s per-state delivery counts by `deltas` and sets its state from
    /// them. O(1) in the number of deliveries; the message row stays locked until the
    /// transaction ends (every writer locks its delivery rows first, then the message).
    pub(crate) async fn shift_counts(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        message_id: Uuid,
        deltas: &[(S, i64)],
    ) -> Result<(), StoreError> {
        if deltas.iter().all(|(_, n)| *n == 0) {
            return Ok(());
        }
        let select = tx
            .prepare_cached("SELECT state_counts FROM messages WHERE id = $1 FOR UPDATE")
            .await?;
        let Some(row) = tx.query_opt(&select, &[&message_id]).await? else {
            return Ok(());
        };
        let stored: serde_json::Value = row.get(0);
        let mut counts: BTreeMap<String, i64> = serde_json::from_value(stored).unwrap_or_default();
        for (state, n) in deltas {
            *counts.entry(state.name().to_string()).or_default() += n;
        }
        counts.retain(|_, n| *n > 0);
        let state = aggregate_counts(&counts).map(|s| s.name());
        let update = tx
            .prepare_cached(
                "UPDATE messages SET state_counts = $2, state = COALESCE($3, state),
                    updated_at = now() WHERE id = $1",
            )
            .await?;
        tx.execute(&update, &[&message_id, &json!(counts), &state])
            .await?;
        Ok(())
    }
}
