//! Tenants, their API keys and provider accounts.

use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{Store, StoreError};

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
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO tenants (id, name, amqp_user) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, amqp_user = EXCLUDED.amqp_user",
            )
            .await?;
        client
            .execute(&statement, &[&id, &name, &amqp_user])
            .await?;
        Ok(())
    }

    /// The tenant whose AMQP publishes come from `user` (RabbitMQ's validated user_id).
    pub async fn tenant_for_amqp_user(&self, user: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT id FROM tenants WHERE amqp_user = $1")
            .await?;
        let row = client.query_opt(&statement, &[&user]).await?;
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
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO api_keys (id, tenant_id, key_prefix, key_hash) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (key_hash) DO NOTHING",
            )
            .await?;
        client
            .execute(
                &statement,
                &[&Uuid::now_v7(), &tenant, &prefix, &key_hash(key)],
            )
            .await?;
        Ok(())
    }

    /// The tenant an API key belongs to, unless unknown or revoked.
    pub async fn tenant_for_api_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT tenant_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
            )
            .await?;
        let row = client.query_opt(&statement, &[&key_hash(key)]).await?;
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
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO provider_accounts (id, tenant_id, kind, channel, app_id, is_default)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, kind = EXCLUDED.kind,
                   channel = EXCLUDED.channel, app_id = EXCLUDED.app_id, is_default = EXCLUDED.is_default",
            )
            .await?;
        client
            .execute(
                &statement,
                &[&id, &tenant, &kind, &channel, &app_id, &is_default],
            )
            .await?;
        Ok(())
    }

    /// Whether `account` is one of `tenant`'s accounts for `channel` (a robot a request names
    /// must be the tenant's own).
    pub async fn is_tenant_account(
        &self,
        tenant: &str,
        account: &str,
        channel: &str,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT 1 FROM provider_accounts WHERE id = $1 AND tenant_id = $2 AND channel = $3",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&account, &tenant, &channel])
            .await?;
        Ok(row.is_some())
    }

    /// The account a tenant sends from on `channel` when the request names none.
    pub async fn default_provider_account(
        &self,
        tenant: &str,
        channel: &str,
    ) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        // One provider account serves every channel of its provider (a WeChat Official
        // Account sends template and subscribe messages): the account registered for the
        // channel itself wins, else the default of a sibling channel (`wechat.*`).
        let statement = client
            .prepare_cached(
                "SELECT id FROM provider_accounts \
                 WHERE tenant_id = $1 AND is_default \
                   AND split_part(channel, '.', 1) = split_part($2, '.', 1) \
                 ORDER BY channel = $2 DESC, channel LIMIT 1",
            )
            .await?;
        let row = client.query_opt(&statement, &[&tenant, &channel]).await?;
        Ok(row.map(|r| r.get(0)))
    }
}
