//! Deliveries that are decided before they are sent: created directly as `suppressed`.

use herald_contract::v1::DeliveryState as S;
use serde_json::json;
use uuid::Uuid;

use crate::messages::NewDelivery;
use crate::{Store, StoreError};

impl Store {
    /// Creates deliveries of a rendered message directly in state `suppressed` (idempotent by
    /// delivery id; one that exists and is still `queued` is moved to `suppressed`): each gets
    /// its history row and its status announcement with `reason` as the error code and
    /// `detail` as the error message, and nothing is queued for sending.
    pub async fn create_suppressed_deliveries(
        &self,
        message_id: Uuid,
        tenant: &str,
        deliveries: &[NewDelivery],
        reason: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        let trace_id = herald_telemetry::current_trace_id();
        let traceparent = herald_telemetry::current_traceparent();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO deliveries (id, message_id, tenant_id, channel, provider_account,
                    recipient, state, last_error_code, last_error, traceparent)
                 VALUES ($1, $2, $3, $4, $5, $6, 'suppressed', $7, $8, $9)
                 ON CONFLICT (id) DO NOTHING RETURNING id",
            )
            .await?;
        let suppress_queued = tx
            .prepare_cached(
                "UPDATE deliveries SET state = 'suppressed', last_error_code = $2,
                    last_error = $3, updated_at = now()
                 WHERE id = $1 AND state = 'queued'",
            )
            .await?;
        let history = tx
            .prepare_cached(
                "INSERT INTO delivery_events (delivery_id, state, source, detail, trace_id)
                 VALUES ($1, 'suppressed', 'renderer', $2, $3)",
            )
            .await?;
        let mut deltas = Vec::new();
        for d in deliveries {
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
                        &reason,
                        &detail,
                        &traceparent,
                    ],
                )
                .await?;
            if inserted.is_none() {
                // Created before (a redelivered request): only a delivery still `queued` (its
                // job perhaps never published) is suppressed now; anything later stays.
                let updated = tx
                    .execute(&suppress_queued, &[&d.id, &reason, &detail])
                    .await?;
                if updated == 0 {
                    continue;
                }
                deltas.push((S::Queued, -1));
            }
            deltas.push((S::Suppressed, 1));
            tx.execute(
                &history,
                &[
                    &d.id,
                    &json!({ "reason": reason, "message": detail }),
                    &trace_id,
                ],
            )
            .await?;
            self.announce(
                &tx,
                d.id,
                message_id,
                tenant,
                &d.channel,
                S::Suppressed,
                Some(reason),
                Some(detail),
            )
            .await?;
        }
        self.shift_counts(&tx, message_id, &deltas).await?;
        tx.commit().await?;
        self.outbox_written();
        Ok(())
    }
}
