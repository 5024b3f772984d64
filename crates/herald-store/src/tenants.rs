//! Tenants, their API keys, provider accounts and templates.

use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{Store, StoreError};

/// A published template version.
#[derive(Debug, Clone)]
pub struct TemplateRecord {
    pub id: String,
    pub version: i32,
    pub definition: serde_json::Value,
}

fn key_hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

impl Store {
    /// Creates or updates a tenant.
    pub async fn upsert_tenant(
        &self,
        id: &str,
        name: &str,
        amqp_user: Option<&str>,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO tenants (id, name, amqp_user) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, amqp_user = EXCLUDED.amqp_user",
                &[&id, &name, &amqp_user],
            )
            .await?;
        Ok(())
    }

    /// The tenant whose AMQP publishes come from `user` (RabbitMQ's validated user_id).
    pub async fn tenant_for_amqp_user(&self, user: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT id FROM tenants WHERE amqp_user = $1", &[&user])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Issues a new API key for `tenant`; the key is returned once and only its hash is kept.
    pub async fn create_api_key(&self, tenant: &str) -> Result<String, StoreError> {
        let mut secret = [0u8; 24];
        rand::rng().fill_bytes(&mut secret);
        let key = format!("hk_{}", hex::encode(secret));
        self.insert_api_key(tenant, &key).await?;
        Ok(key)
    }

    /// Registers a key chosen by the operator (seeding a known dev key); idempotent.
    pub async fn insert_api_key(&self, tenant: &str, key: &str) -> Result<(), StoreError> {
        let prefix: String = key.chars().take(8).collect();
        self.client()
            .await?
            .execute(
                "INSERT INTO api_keys (id, tenant_id, key_prefix, key_hash) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (key_hash) DO NOTHING",
                &[&Uuid::now_v7(), &tenant, &prefix, &key_hash(key)],
            )
            .await?;
        Ok(())
    }

    /// The tenant an API key belongs to, unless unknown or revoked.
    pub async fn tenant_for_api_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT tenant_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                &[&key_hash(key)],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Creates or updates a provider account (no secrets: those live with the token service).
    pub async fn upsert_provider_account(
        &self,
        id: &str,
        tenant: &str,
        kind: &str,
        channel: &str,
        app_id: &str,
        is_default: bool,
    ) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO provider_accounts (id, tenant_id, kind, channel, app_id, is_default)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, kind = EXCLUDED.kind,
                   channel = EXCLUDED.channel, app_id = EXCLUDED.app_id, is_default = EXCLUDED.is_default",
                &[&id, &tenant, &kind, &channel, &app_id, &is_default],
            )
            .await?;
        Ok(())
    }

    /// The account a tenant sends from on `channel` when the request names none.
    pub async fn default_provider_account(
        &self,
        tenant: &str,
        channel: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id FROM provider_accounts WHERE tenant_id = $1 AND channel = $2 AND is_default",
                &[&tenant, &channel],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Stores `definition` as the next immutable version of a template and publishes it.
    /// Storing a definition equal to the published one is a no-op returning that version.
    pub async fn publish_template(
        &self,
        tenant: &str,
        id: &str,
        definition: &serde_json::Value,
    ) -> Result<i32, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO templates (tenant_id, id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&tenant, &id],
        )
        .await?;
        let current = tx
            .query_one(
                "SELECT t.published_version, v.definition FROM templates t
                 LEFT JOIN template_versions v ON v.tenant_id = t.tenant_id
                   AND v.template_id = t.id AND v.version = t.published_version
                 WHERE t.tenant_id = $1 AND t.id = $2 FOR UPDATE OF t",
                &[&tenant, &id],
            )
            .await?;
        let published: Option<i32> = current.get(0);
        let published_definition: Option<serde_json::Value> = current.get(1);
        if let (Some(version), Some(existing)) = (published, published_definition)
            && &existing == definition
        {
            tx.commit().await?;
            return Ok(version);
        }
        let next: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM template_versions
                 WHERE tenant_id = $1 AND template_id = $2",
                &[&tenant, &id],
            )
            .await?
            .get(0);
        tx.execute(
            "INSERT INTO template_versions (tenant_id, template_id, version, definition)
             VALUES ($1, $2, $3, $4)",
            &[&tenant, &id, &next, definition],
        )
        .await?;
        tx.execute(
            "UPDATE templates SET published_version = $3 WHERE tenant_id = $1 AND id = $2",
            &[&tenant, &id, &next],
        )
        .await?;
        tx.commit().await?;
        Ok(next)
    }

    /// A template version: the published one when `version` is `None`.
    pub async fn template(
        &self,
        tenant: &str,
        id: &str,
        version: Option<i32>,
    ) -> Result<Option<TemplateRecord>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT v.version, v.definition FROM templates t
                 JOIN template_versions v ON v.tenant_id = t.tenant_id AND v.template_id = t.id
                 WHERE t.tenant_id = $1 AND t.id = $2
                   AND v.version = COALESCE($3, t.published_version)",
                &[&tenant, &id, &version],
            )
            .await?;
        Ok(row.map(|r| TemplateRecord {
            id: id.to_string(),
            version: r.get(0),
            definition: r.get(1),
        }))
    }
}
