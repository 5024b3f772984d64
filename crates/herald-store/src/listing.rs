//! The status API's look-up: a tenant's messages by recipient, template, time and state,
//! newest first, with keyset pagination.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::{Store, StoreError};

/// Filters of `GET /v1/messages`; `None` means "any".
#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    /// A delivery's recipient address (e.g. an openid).
    pub recipient: Option<String>,
    pub template: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// The message state (`accepted`, `rejected`, or its deliveries' aggregate).
    pub state: Option<String>,
    /// Strictly after this (created_at, id) in newest-first order: the last row of the
    /// previous page.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// One message in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct MessageSummary {
    pub id: Uuid,
    pub template: String,
    pub state: String,
    pub error: Option<String>,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deliveries: Vec<DeliverySummary>,
}

/// A delivery in a listing (the timeline is in `GET /v1/messages/{id}`).
#[derive(Debug, Clone, Serialize)]
pub struct DeliverySummary {
    pub id: Uuid,
    pub channel: String,
    pub provider_account: String,
    pub recipient: String,
    pub state: String,
    pub attempts: i32,
    pub provider_msgid: Option<String>,
    pub last_error_code: Option<String>,
    pub last_error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl Store {
    /// A page of `tenant`'s messages matching `filter`, newest first (ties broken by id).
    pub async fn list_messages(
        &self,
        tenant: &str,
        filter: &MessageFilter,
    ) -> Result<Vec<MessageSummary>, StoreError> {
        let client = self.client().await?;
        let (after_at, after_id) = filter.after.unzip();
        // Not cached: the filters are optional (`$n IS NULL OR ...`), and a cached statement
        // may get a generic plan that keeps them all; unprepared, each call is planned for
        // the filters it has.
        let rows = client
            .query(
                "SELECT m.id, m.template_id, m.state, m.error, m.source, m.created_at, m.updated_at
                 FROM messages m
                 WHERE m.tenant_id = $1
                   AND ($2::text IS NULL OR EXISTS (
                        SELECT 1 FROM deliveries d
                        WHERE d.tenant_id = $1 AND d.recipient = $2 AND d.message_id = m.id))
                   AND ($3::text IS NULL OR m.template_id = $3)
                   AND ($4::timestamptz IS NULL OR m.created_at >= $4)
                   AND ($5::text IS NULL OR m.state = $5)
                   AND ($6::timestamptz IS NULL OR (m.created_at, m.id) < ($6, $7::uuid))
                 ORDER BY m.created_at DESC, m.id DESC
                 LIMIT $8",
                &[
                    &tenant,
                    &filter.recipient,
                    &filter.template,
                    &filter.since,
                    &filter.state,
                    &after_at,
                    &after_id,
                    &filter.limit.max(0),
                ],
            )
            .await?;
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        let select_deliveries = client
            .prepare_cached(
                "SELECT message_id, id, channel, provider_account, recipient, state, attempt,
                        provider_msgid, last_error_code, last_error, updated_at
                 FROM deliveries WHERE message_id = ANY($1) ORDER BY created_at, id",
            )
            .await?;
        let deliveries = client.query(&select_deliveries, &[&ids]).await?;
        Ok(rows
            .iter()
            .map(|m| {
                let id: Uuid = m.get(0);
                MessageSummary {
                    id,
                    template: m.get(1),
                    state: m.get(2),
                    error: m.get(3),
                    source: m.get(4),
                    created_at: m.get(5),
                    updated_at: m.get(6),
                    deliveries: deliveries
                        .iter()
                        .filter(|d| d.get::<_, Uuid>(0) == id)
                        .map(|d| DeliverySummary {
                            id: d.get(1),
                            channel: d.get(2),
                            provider_account: d.get(3),
                            recipient: d.get(4),
                            state: d.get(5),
                            attempts: d.get(6),
                            provider_msgid: d.get(7),
                            last_error_code: d.get(8),
                            last_error: d.get(9),
                            updated_at: d.get(10),
                        })
                        .collect(),
                }
            })
            .collect())
    }
}
