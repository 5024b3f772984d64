//! Per-tenant status webhooks (Standard Webhooks): where a tenant's status events are POSTed
//! and the secret that signs them.

use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;

use crate::{Store, StoreError};

/// A tenant's status webhook.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantWebhook {
    pub tenant_id: String,
    pub url: String,
    /// `whsec_<base64>`; the base64 part is the HMAC key.
    pub secret: String,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for TenantWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantWebhook")
            .field("tenant_id", &self.tenant_id)
            .field("url", &self.url)
            .field("secret", &"whsec_***")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// A new signing secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_webhook_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

impl Store {
    /// Sets (creates or replaces) a tenant's status webhook.
    pub async fn set_tenant_webhook(
        &self,
        tenant: &str,
        url: &str,
        secret: &str,
    ) -> Result<TenantWebhook, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO tenant_webhooks (tenant_id, url, secret) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant_id) DO UPDATE
                   SET url = EXCLUDED.url, secret = EXCLUDED.secret, enabled = true, updated_at = now()
                 RETURNING tenant_id, url, secret, enabled, created_at, updated_at",
            )
            .await?;
        let row = client
            .query_one(&statement, &[&tenant, &url, &secret])
            .await?;
        Ok(webhook(&row))
    }

    /// A tenant's status webhook, if it has one.
    pub async fn tenant_webhook(&self, tenant: &str) -> Result<Option<TenantWebhook>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT tenant_id, url, secret, enabled, created_at, updated_at
                 FROM tenant_webhooks WHERE tenant_id = $1",
            )
            .await?;
        let row = client.query_opt(&statement, &[&tenant]).await?;
        Ok(row.as_ref().map(webhook))
    }

    /// Removes a tenant's status webhook; whether there was one.
    pub async fn delete_tenant_webhook(&self, tenant: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("DELETE FROM tenant_webhooks WHERE tenant_id = $1")
            .await?;
        let deleted = client.execute(&statement, &[&tenant]).await?;
        Ok(deleted > 0)
    }
}

fn webhook(row: &tokio_postgres::Row) -> TenantWebhook {
    TenantWebhook {
        tenant_id: row.get(0),
        url: row.get(1),
        secret: row.get(2),
        enabled: row.get(3),
        created_at: row.get(4),
        updated_at: row.get(5),
    }
}
