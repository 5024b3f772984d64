//! The recipient directory: what providers told us about recipients (follow state per
//! provider account, answers to subscription templates), fed by callbacks.

use chrono::{DateTime, Utc};
use herald_contract::v1::RecipientEvent;
use serde_json::json;

use crate::{Store, StoreError};

/// What happened to a recipient event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientEventOutcome {
    Applied,
    /// Seen before (providers retry callbacks).
    Duplicate,
    /// Recorded in the history, but a later event of the provider's already decided the state.
    Stale,
    /// Recorded in the history; nothing in the directory follows from it.
    Recorded,
}

/// A recipient's follow state for one provider account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowState {
    pub following: bool,
    /// The provider's time of the event that decided it.
    pub changed_at: DateTime<Utc>,
}

fn occurred_at(event: &RecipientEvent) -> DateTime<Utc> {
    event
        .occurred_at
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .unwrap_or_else(Utc::now)
}

impl Store {
    /// Applies a normalised recipient event once: the history row de-duplicates by event id,
    /// and directory rows only move to a provider time at least as late as the one they have.
    pub async fn apply_recipient_event(
        &self,
        event: &RecipientEvent,
    ) -> Result<RecipientEventOutcome, StoreError> {
        let at = occurred_at(event);
        let consents: Vec<serde_json::Value> = event
            .consents
            .iter()
            .map(|c| json!({ "template_id": c.template_id, "status": c.status }))
            .collect();
        let detail = if consents.is_empty() {
            json!({})
        } else {
            json!({ "consents": consents })
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let insert_event = tx
            .prepare_cached(
                "INSERT INTO recipient_events
                    (event_id, provider, provider_account, recipient, kind, detail, occurred_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (event_id) DO NOTHING RETURNING id",
            )
            .await?;
        let inserted = tx
            .query_opt(
                &insert_event,
                &[
                    &event.event_id,
                    &event.provider,
                    &event.provider_account,
                    &event.recipient,
                    &event.kind,
                    &detail,
                    &at,
                ],
            )
            .await?;
        if inserted.is_none() {
            return Ok(RecipientEventOutcome::Duplicate);
        }
        let outcome = match event.kind.as_str() {
            "subscribe" | "unsubscribe" => {
                let following = event.kind == "subscribe";
                let upsert = tx
                    .prepare_cached(
                        "INSERT INTO recipient_follows (provider_account, recipient, following, changed_at)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (provider_account, recipient) DO UPDATE
                           SET following = EXCLUDED.following, changed_at = EXCLUDED.changed_at,
                               updated_at = now()
                           WHERE recipient_follows.changed_at <= EXCLUDED.changed_at",
                    )
                    .await?;
                let changed = tx
                    .execute(
                        &upsert,
                        &[&event.provider_account, &event.recipient, &following, &at],
                    )
                    .await?;
                if changed == 0 {
                    RecipientEventOutcome::Stale
                } else {
                    RecipientEventOutcome::Applied
                }
            }
            _ if !event.consents.is_empty() => {
                let upsert = tx
                    .prepare_cached(
                        "INSERT INTO subscription_consents
                            (provider_account, recipient, template_id, status, changed_at)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (provider_account, recipient, template_id) DO UPDATE
                           SET status = EXCLUDED.status, changed_at = EXCLUDED.changed_at,
                               updated_at = now()
                           WHERE subscription_consents.changed_at <= EXCLUDED.changed_at",
                    )
                    .await?;
                let mut changed = 0;
                for consent in &event.consents {
                    changed += tx
                        .execute(
                            &upsert,
                            &[
                                &event.provider_account,
                                &event.recipient,
                                &consent.template_id,
                                &consent.status,
                                &at,
                            ],
                        )
                        .await?;
                }
                if changed == 0 {
                    RecipientEventOutcome::Stale
                } else {
                    RecipientEventOutcome::Applied
                }
            }
            _ => RecipientEventOutcome::Recorded,
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// The follow state of `recipient` for `account`, if a provider ever told us.
    pub async fn follow_state(
        &self,
        account: &str,
        recipient: &str,
    ) -> Result<Option<FollowState>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT following, changed_at FROM recipient_follows
                 WHERE provider_account = $1 AND recipient = $2",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&account, &recipient])
            .await?;
        Ok(row.map(|r| FollowState {
            following: r.get(0),
            changed_at: r.get(1),
        }))
    }

    /// Which of `recipients` are known to have unfollowed `account` (their last follow event
    /// was `unsubscribe`).
    pub async fn unfollowed_recipients(
        &self,
        account: &str,
        recipients: &[String],
    ) -> Result<Vec<String>, StoreError> {
        if recipients.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT recipient FROM recipient_follows
                 WHERE provider_account = $1 AND recipient = ANY($2) AND NOT following",
            )
            .await?;
        let rows = client.query(&statement, &[&account, &recipients]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The recipient's last answer for a subscription template (`accept`, `reject`, ...).
    pub async fn subscription_consent(
        &self,
        account: &str,
        recipient: &str,
        template_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT status FROM subscription_consents
                 WHERE provider_account = $1 AND recipient = $2 AND template_id = $3",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&account, &recipient, &template_id])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}
