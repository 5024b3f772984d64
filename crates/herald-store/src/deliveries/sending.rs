//! What the sender workers and the operator tools need beyond claim and outcome: deferrals (a
//! quota deferral is its own state and does not count as an attempt), the age of a delivery
//! (retries give up after a maximum age), and reopening a failed delivery when an operator
//! replays its parked job.

use chrono::{DateTime, Utc};
use herald_contract::v1::DeliveryState as S;
use serde_json::json;
use uuid::Uuid;

use super::{Change, state_of};
use crate::state::transition_allowed;
use crate::{Store, StoreError};

impl Store {
    /// Marks a delivery `deferred` until `until` (a provider quota is used up). Returns the
    /// state the delivery is in afterwards (unchanged if it had already settled).
    pub async fn record_deferral(
        &self,
        id: Uuid,
        code: &str,
        message: &str,
        until: DateTime<Utc>,
    ) -> Result<S, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = self
            .lock_delivery(&tx, id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("delivery {id}")))?;
        let from = state_of(row.get(4));
        if !transition_allowed(from, S::Deferred) {
            tx.commit().await?;
            return Ok(from);
        }
        let update = tx
            .prepare_cached(
                "UPDATE deliveries SET state = 'deferred', last_error_code = $2, last_error = $3,
                    updated_at = now() WHERE id = $1",
            )
            .await?;
        tx.execute(&update, &[&id, &code, &message]).await?;
        self.record_change(
            &tx,
            &row,
            &Change {
                to: S::Deferred,
                source: "sender",
                detail: json!({ "code": code, "message": message, "until": until.to_rfc3339() }),
                dedup_key: None,
                error_code: Some(code),
                error_message: Some(message),
                announce: true,
            },
        )
        .await?;
        tx.commit().await?;
        self.outbox_written();
        Ok(S::Deferred)
    }

    /// When the delivery was created (retries give up past a maximum age measured from here).
    pub async fn delivery_created_at(&self, id: Uuid) -> Result<Option<DateTime<Utc>>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT created_at FROM deliveries WHERE id = $1")
            .await?;
        let row = client.query_opt(&statement, &[&id]).await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// An operator's replay of a parked job: a `failed` delivery goes back to `queued` (history
    /// row with source `operator`, announced like any change) so the replayed job is sent
    /// again. This is the one deliberate exception to "terminal states never change". Returns
    /// whether the delivery was reopened; any other state is left alone.
    pub async fn reopen_failed_delivery(&self, id: Uuid, reason: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(row) = self.lock_delivery(&tx, id).await? else {
            return Ok(false);
        };
        if state_of(row.get(4)) != S::Failed {
            return Ok(false);
        }
        let update = tx
            .prepare_cached(
                "UPDATE deliveries SET state = 'queued', updated_at = now() WHERE id = $1",
            )
            .await?;
        tx.execute(&update, &[&id]).await?;
        self.record_change(
            &tx,
            &row,
            &Change {
                to: S::Queued,
                source: "operator",
                detail: json!({ "reopened": reason }),
                dedup_key: None,
                error_code: None,
                error_message: None,
                announce: true,
            },
        )
        .await?;
        tx.commit().await?;
        self.outbox_written();
        Ok(true)
    }
}
