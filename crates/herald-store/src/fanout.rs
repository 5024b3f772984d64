//! Writing a rendered message's deliveries in batches. Each batch is one transaction: the
//! delivery rows (`ON CONFLICT DO NOTHING` on their deterministic ids), their history rows,
//! their status events and their jobs (in the outbox, or in `scheduled_jobs` when held back)
//! and the message's counters and fan-out cursor. A renderer that dies mid-fan-out leaves
//! whole batches; the redelivered request skips what is written and creates no job twice.

use chrono::{DateTime, Utc};
use herald_contract::v1::DeliveryState as S;
use serde_json::json;
use uuid::Uuid;

use crate::messages::NewDelivery;
use crate::outbox::OutboxJob;
use crate::{Store, StoreError};

/// What becomes of one planned delivery.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Queue it: the job goes to the outbox.
    Send(OutboxJob),
    /// Hold it back until `until` (send_at, quiet hours): `deferred`, job in `scheduled_jobs`.
    Defer {
        job: OutboxJob,
        until: DateTime<Utc>,
        reason: String,
        detail: String,
    },
    /// Do not send (opt-out, frequency cap, duplicate, unfollowed, no address): `suppressed`.
    Suppress { reason: String, detail: String },
}

/// A delivery the renderer decided on.
#[derive(Debug, Clone)]
pub struct PlannedDelivery {
    pub delivery: NewDelivery,
    pub decision: Decision,
}

/// The result of writing one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchWritten {
    /// This many deliveries were new (the rest existed from an earlier, interrupted run).
    Written { created: usize },
    /// The message was cancelled: nothing written, stop fanning out.
    Cancelled,
}

/// Where a message's fan-out stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FanoutProgress {
    /// Recipients (by index in the request) whose deliveries are written.
    pub done: usize,
    pub cancelled: bool,
}

impl Store {
    /// How far `message_id`'s fan-out got, and whether it was cancelled.
    pub async fn fanout_progress(&self, message_id: Uuid) -> Result<FanoutProgress, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT fanout_done, cancelled_at IS NOT NULL FROM messages WHERE id = $1",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&message_id])
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("message {message_id}")))?;
        Ok(FanoutProgress {
            done: usize::try_from(row.get::<_, i32>(0)).unwrap_or(0),
            cancelled: row.get(1),
        })
    }

    /// Writes one batch of deliveries (see the module docs); `done` is the fan-out cursor
    /// after this batch (recipients up to this index are written).
    pub async fn write_fanout_batch(
        &self,
        message_id: Uuid,
        tenant: &str,
        done: usize,
        planned: &[PlannedDelivery],
    ) -> Result<BatchWritten, StoreError> {
        let trace_id = herald_telemetry::current_trace_id();
        let traceparent = herald_telemetry::current_traceparent();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = planned.len();
        let (mut ids, mut channels, mut accounts, mut recipients) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut states, mut codes, mut errors) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for p in planned {
            let d = &p.delivery;
            ids.push(d.id);
            channels.push(d.channel.clone());
            accounts.push(d.provider_account.clone());
            recipients.push(d.recipient.clone());
            let (state, code, error) = match &p.decision {
                Decision::Send(_) => (S::Queued, None, None),
                Decision::Defer { reason, detail, .. } => {
                    (S::Deferred, Some(reason.clone()), Some(detail.clone()))
                }
                Decision::Suppress { reason, detail } => {
                    (S::Suppressed, Some(reason.clone()), Some(detail.clone()))
                }
            };
            states.push(state.name().to_string());
            codes.push(code);
            errors.push(error);
        }
        let insert_deliveries = tx
            .prepare_cached(
                "INSERT INTO deliveries (id, message_id, tenant_id, channel, provider_account,
                    recipient, state, last_error_code, last_error, traceparent)
                 SELECT u.id, $1, $2, u.channel, u.account, u.recipient, u.state, u.code, u.error, $3
                 FROM UNNEST($4::uuid[], $5::text[], $6::text[], $7::text[], $8::text[],
                             $9::text[], $10::text[])
                      AS u(id, channel, account, recipient, state, code, error)
                 ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .await?;
        let inserted: std::collections::HashSet<Uuid> = tx
            .query(
                &insert_deliveries,
                &[
                    &message_id,
                    &tenant,
                    &traceparent,
                    &ids,
                    &channels,
                    &accounts,
                    &recipients,
                    &states,
                    &codes,
                    &errors,
                ],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();

        let (mut event_ids, mut event_states, mut event_details) = (vec![], vec![], vec![]);
        let (mut announcements, mut jobs) = (vec![], vec![]);
        let (mut held_ids, mut held_due, mut held_exchange, mut held_key) =
            (vec![], vec![], vec![], vec![]);
        let (mut held_headers, mut held_body, mut held_priority) = (vec![], vec![], vec![]);
        let (mut queued, mut deferred, mut suppressed) = (0i64, 0i64, 0i64);
        for p in planned.iter().filter(|p| inserted.contains(&p.delivery.id)) {
            let d = &p.delivery;
            let (state, detail, code, message) = match &p.decision {
                Decision::Send(job) => {
                    jobs.push(job.clone());
                    queued += 1;
                    (S::Queued, json!({}), None, None)
                }
                Decision::Defer {
                    job,
                    until,
                    reason,
                    detail,
                } => {
                    held_ids.push(d.id);
                    held_due.push(*until);
                    held_exchange.push(job.message.exchange.clone());
                    held_key.push(job.message.routing_key.clone());
                    held_headers
                        .push(serde_json::to_value(&job.message.headers).unwrap_or_default());
                    held_body.push(job.message.body.clone());
                    held_priority.push(i16::from(job.priority));
                    deferred += 1;
                    (
                        S::Deferred,
                        json!({ "reason": reason, "message": detail, "until": until.to_rfc3339() }),
                        Some(reason.as_str()),
                        Some(detail.as_str()),
                    )
                }
                Decision::Suppress { reason, detail } => {
                    suppressed += 1;
                    (
                        S::Suppressed,
                        json!({ "reason": reason, "message": detail }),
                        Some(reason.as_str()),
                        Some(detail.as_str()),
                    )
                }
            };
            event_ids.push(d.id);
            event_states.push(state.name().to_string());
            event_details.push(detail);
            announcements.push(
                self.status_message(d.id, message_id, tenant, &d.channel, state, code, message),
            );
        }
        if !event_ids.is_empty() {
            let insert_events = tx
                .prepare_cached(
                    "INSERT INTO delivery_events (delivery_id, state, source, detail, trace_id)
                     SELECT u.id, u.state, 'renderer', u.detail, $1
                     FROM UNNEST($2::uuid[], $3::text[], $4::jsonb[]) AS u(id, state, detail)",
                )
                .await?;
            tx.execute(
                &insert_events,
                &[&trace_id, &event_ids, &event_states, &event_details],
            )
            .await?;
        }
        if !held_ids.is_empty() {
            let insert_held = tx
                .prepare_cached(
                    "INSERT INTO scheduled_jobs (delivery_id, message_id, due_at, exchange,
                        routing_key, headers, body, priority)
                     SELECT u.id, $1, u.due, u.exchange, u.key, u.headers, u.body, u.priority
                     FROM UNNEST($2::uuid[], $3::timestamptz[], $4::text[], $5::text[],
                                 $6::jsonb[], $7::bytea[], $8::int2[])
                          AS u(id, due, exchange, key, headers, body, priority)
                     ON CONFLICT (delivery_id) DO NOTHING",
                )
                .await?;
            tx.execute(
                &insert_held,
                &[
                    &message_id,
                    &held_ids,
                    &held_due,
                    &held_exchange,
                    &held_key,
                    &held_headers,
                    &held_body,
                    &held_priority,
                ],
            )
            .await?;
        }
        // The message row is locked last, as every writer does (delivery rows, then the
        // message), so this never deadlocks with a sender. Under that lock a cancellation
        // (which sets cancelled_at under it) is either seen here or waits for this batch.
        let lock_message = tx
            .prepare_cached(
                "SELECT cancelled_at IS NOT NULL FROM messages WHERE id = $1 FOR UPDATE",
            )
            .await?;
        let cancelled: bool = tx.query_one(&lock_message, &[&message_id]).await?.get(0);
        if cancelled {
            // Dropping the transaction rolls the batch back.
            return Ok(BatchWritten::Cancelled);
        }
        Self::insert_outbox_many(&tx, &announcements, &jobs).await?;
        self.shift_counts(
            &tx,
            message_id,
            &[
                (S::Queued, queued),
                (S::Deferred, deferred),
                (S::Suppressed, suppressed),
            ],
        )
        .await?;
        let advance = tx
            .prepare_cached(
                "UPDATE messages SET fanout_done = GREATEST(fanout_done, $2) WHERE id = $1",
            )
            .await?;
        tx.execute(
            &advance,
            &[&message_id, &i32::try_from(done).unwrap_or(i32::MAX)],
        )
        .await?;
        tx.commit().await?;
        if !announcements.is_empty() || !jobs.is_empty() {
            self.outbox_written();
        }
        Ok(BatchWritten::Written {
            created: inserted.len(),
        })
    }
}
