//! Messages (one per accepted request) and the read model of their lifecycle.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::outbox::OutboxMessage;
use crate::{Store, StoreError};

/// A request to record.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: Uuid,
    pub tenant_id: String,
    pub template_id: String,
    pub idempotency_key: Option<String>,
    /// The canonical JSON of the request, as text (a 10,000-recipient request as a
    /// `serde_json::Value` tree takes ten times the memory of its text).
    pub request: String,
    /// SHA-256 of what the producer sent, to tell a replay from a conflicting reuse.
    pub request_hash: Vec<u8>,
    /// `rest` or `amqp`.
    pub source: &'static str,
    pub traceparent: Option<String>,
}

/// How an accepted request relates to what was stored before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    New(Uuid),
    /// Same idempotency key (or id) and same request: the original message.
    Replay(Uuid),
}

impl Accepted {
    pub fn id(self) -> Uuid {
        match self {
            Accepted::New(id) | Accepted::Replay(id) => id,
        }
    }
}

/// A stored message.
#[derive(Debug, Clone)]
pub struct MessageRecord {
    pub id: Uuid,
    pub tenant_id: String,
    /// The stored request's JSON text.
    pub request: String,
    pub state: String,
    pub traceparent: Option<String>,
}

/// A delivery to create for a rendered message.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: Uuid,
    pub channel: String,
    pub provider_account: String,
    pub recipient: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    pub id: Uuid,
    pub tenant: String,
    pub template: String,
    pub state: String,
    pub error: Option<String>,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Deliveries per state (what the message state is aggregated from).
    pub counts: std::collections::BTreeMap<String, i64>,
    pub deliveries: Vec<DeliveryView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    pub id: Uuid,
    pub channel: String,
    pub provider_account: String,
    pub recipient: String,
    pub state: String,
    pub attempts: i32,
    pub provider_msgid: Option<String>,
    pub last_error_code: Option<String>,
    pub last_error: Option<String>,
    pub timeline: Vec<TimelineEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    pub state: String,
    pub source: String,
    pub at: DateTime<Utc>,
    pub detail: serde_json::Value,
    pub trace_id: Option<String>,
}

/// Inserts a message unless its id or idempotency key exists; `Some` when inserted.
async fn insert_message(
    client: &impl deadpool_postgres::GenericClient,
    message: &NewMessage,
) -> Result<Option<tokio_postgres::Row>, StoreError> {
    let statement = client
        .prepare_cached(
            "INSERT INTO messages (id, tenant_id, template_id, idempotency_key, request_hash,
                request, source, state, traceparent)
             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, 'accepted', $8)
             ON CONFLICT DO NOTHING RETURNING id, tenant_id, state, traceparent",
        )
        .await?;
    Ok(client
        .query_opt(
            &statement,
            &[
                &message.id,
                &message.tenant_id,
                &message.template_id,
                &message.idempotency_key,
                &message.request_hash,
                &message.request,
                &message.source,
                &message.traceparent,
            ],
        )
        .await?)
}

impl Store {
    /// Records a REST request and its outbox row in one transaction (durable before the 202).
    /// A replay of the same idempotency key (or id) with the same request returns the
    /// original; with a different request it is a conflict.
    pub async fn accept_message(
        &self,
        message: &NewMessage,
        outbox: &OutboxMessage,
    ) -> Result<Accepted, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let inserted = insert_message(&tx, message).await?;
        if inserted.is_none() {
            let statement = tx
                .prepare_cached(
                    "SELECT id, request_hash FROM messages
                     WHERE (tenant_id = $1 AND idempotency_key = $2) OR id = $3
                     ORDER BY (id = $3) LIMIT 1",
                )
                .await?;
            let existing = tx
                .query_opt(
                    &statement,
                    &[&message.tenant_id, &message.idempotency_key, &message.id],
                )
                .await?;
            let Some(row) = existing else {
                // Lost a race with a concurrent insert that then rolled back: report as conflict
                // so the client retries rather than silently dropping.
                return Err(StoreError::IdempotencyConflict);
            };
            let id: Uuid = row.get(0);
            let hash: Vec<u8> = row.get(1);
            if hash != message.request_hash {
                return Err(if message.idempotency_key.is_some() {
                    StoreError::IdempotencyConflict
                } else {
                    StoreError::IdConflict(id)
                });
            }
            return Ok(Accepted::Replay(id));
        }
        Self::insert_outbox(&tx, outbox).await?;
        tx.commit().await?;
        self.outbox_written();
        Ok(Accepted::New(message.id))
    }

    /// The message with this id, if any.
    pub async fn message(&self, id: Uuid) -> Result<Option<MessageRecord>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT id, tenant_id, request::text, state, traceparent FROM messages WHERE id = $1",
            )
            .await?;
        let row = client.query_opt(&statement, &[&id]).await?;
        Ok(row.map(|r| MessageRecord {
            id: r.get(0),
            tenant_id: r.get(1),
            request: r.get(2),
            state: r.get(3),
            traceparent: r.get(4),
        }))
    }

    /// Stores a message that arrived over AMQP unless one with its id exists; returns the
    /// stored one either way (the stored request wins over a replayed body).
    pub async fn ensure_message(&self, message: NewMessage) -> Result<MessageRecord, StoreError> {
        // Inserted: the record is what was just written (not read back: the request can be
        // thousands of recipients long).
        if let Some(row) = insert_message(&self.client().await?, &message).await? {
            return Ok(MessageRecord {
                id: row.get(0),
                tenant_id: row.get(1),
                request: message.request,
                state: row.get(2),
                traceparent: row.get(3),
            });
        }
        if let Some(record) = self.message(message.id).await? {
            return Ok(record);
        }
        // Not inserted and not under this id: the idempotency key names an earlier message,
        // which is the one to process (idempotently) instead — unless this is another request
        // reusing the key, which must not vanish silently.
        // In a block: the connection goes back to the pool before `self.message` takes one.
        let row = {
            let client = self.client().await?;
            let statement = client
                .prepare_cached(
                    "SELECT id, request_hash FROM messages WHERE tenant_id = $1 AND idempotency_key = $2",
                )
                .await?;
            client
                .query_opt(&statement, &[&message.tenant_id, &message.idempotency_key])
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("message {}", message.id)))?
        };
        if row.get::<_, Vec<u8>>(1) != message.request_hash {
            return Err(StoreError::IdempotencyConflict);
        }
        self.message(row.get(0))
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("message {}", message.id)))
    }

    /// Marks a message rejected (bad template, bad variables), keeping the reason.
    pub async fn reject_message(&self, id: Uuid, error: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE messages SET state = 'rejected', error = $2, updated_at = now()
                 WHERE id = $1 AND state = 'accepted'",
            )
            .await?;
        client.execute(&statement, &[&id, &error]).await?;
        Ok(())
    }

    /// A message with every delivery and its timeline, scoped to `tenant`.
    pub async fn message_view(
        &self,
        tenant: &str,
        id: Uuid,
    ) -> Result<Option<MessageView>, StoreError> {
        let client = self.client().await?;
        let select_message = client
            .prepare_cached(
                "SELECT id, tenant_id, template_id, state, error, source, created_at, updated_at,
                        state_counts
                 FROM messages WHERE id = $1 AND tenant_id = $2",
            )
            .await?;
        let Some(m) = client.query_opt(&select_message, &[&id, &tenant]).await? else {
            return Ok(None);
        };
        let select_deliveries = client
            .prepare_cached(
                "SELECT id, channel, provider_account, recipient, state, attempt, provider_msgid,
                        last_error_code, last_error
                 FROM deliveries WHERE message_id = $1 ORDER BY created_at, id",
            )
            .await?;
        let deliveries = client.query(&select_deliveries, &[&id]).await?;
        let select_events = client
            .prepare_cached(
                "SELECT e.delivery_id, e.state, e.source, e.occurred_at, e.detail, e.trace_id
                 FROM delivery_events e JOIN deliveries d ON d.id = e.delivery_id
                 WHERE d.message_id = $1 ORDER BY e.id",
            )
            .await?;
        let events = client.query(&select_events, &[&id]).await?;
        let deliveries = deliveries
            .iter()
            .map(|d| {
                let delivery_id: Uuid = d.get(0);
                DeliveryView {
                    id: delivery_id,
                    channel: d.get(1),
                    provider_account: d.get(2),
                    recipient: d.get(3),
                    state: d.get(4),
                    attempts: d.get(5),
                    provider_msgid: d.get(6),
                    last_error_code: d.get(7),
                    last_error: d.get(8),
                    timeline: events
                        .iter()
                        .filter(|e| e.get::<_, Uuid>(0) == delivery_id)
                        .map(|e| TimelineEntry {
                            state: e.get(1),
                            source: e.get(2),
                            at: e.get(3),
                            detail: e.get(4),
                            trace_id: e.get(5),
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Some(MessageView {
            id: m.get(0),
            tenant: m.get(1),
            template: m.get(2),
            state: m.get(3),
            error: m.get(4),
            source: m.get(5),
            created_at: m.get(6),
            updated_at: m.get(7),
            counts: serde_json::from_value(m.get(8)).unwrap_or_default(),
            deliveries,
        }))
    }
}
