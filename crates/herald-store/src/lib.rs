//! Herald's Postgres state.
//!
//! One [`Store`] per process wraps a connection pool. Every state change of a delivery goes
//! through one transaction that also appends its history row and an outbox row for the
//! producer-facing status event, so the database and the broker never disagree for long and
//! nothing is lost if a process dies between them (the outbox relay publishes it later).

mod deliveries;
mod directory;
mod fanout;
mod listing;
mod messages;
mod outbox;
mod pending;
mod recipients;
mod schedule;
mod state;
mod suppressed;
mod templates;
mod tenants;
mod webhooks;

use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_postgres::NoTls;

pub use deliveries::{Claim, DeliveryRecord, Fallback, Outcome, ProviderEventOutcome};
pub use directory::{Addresses, FrequencyCap, Preferences, QuietHours, RecipientProfile, mask};
pub use fanout::{BatchWritten, Decision, FanoutProgress, PlannedDelivery};
pub use listing::{DeliverySummary, MessageFilter, MessageSummary};
pub use messages::{
    Accepted, DeliveryView, MessageRecord, MessageView, NewDelivery, NewMessage, TimelineEntry,
};
pub use outbox::{OutboxJob, OutboxMessage};
pub use pending::{ExpiredProviderEvent, UNMATCHED_EVENT};
pub use recipients::{FollowState, RecipientEventOutcome};
pub use schedule::{CANCELLED, Cancellation};
pub use state::{aggregate_counts, aggregate_message_state, transition_allowed};
pub use templates::{
    TemplateHistory, TemplateRecord, TemplateSummary, TemplateVersion, VersionCreated,
};
pub use webhooks::{TenantWebhook, new_webhook_secret};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// `[postgres]` in herald.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct StoreSettings {
    pub url: String,
    pub pool_size: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/herald".into(),
            pool_size: 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("postgres settings: {0}")]
    Config(String),
    #[error("migration: {0}")]
    Migration(#[from] refinery::Error),
    #[error("idempotency key reused with a different request")]
    IdempotencyConflict,
    #[error("message id {0} already used for a different request")]
    IdConflict(uuid::Uuid),
    #[error("{0} not found")]
    NotFound(String),
}

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    status_exchange: Arc<str>,
    outbox_written: Arc<Notify>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens a pool. `status_exchange` is where status events of state changes are published.
    pub async fn connect(
        settings: &StoreSettings,
        status_exchange: &str,
    ) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let store = Self {
            pool,
            status_exchange: status_exchange.into(),
            outbox_written: Arc::new(Notify::new()),
        };
        // Fail fast on a wrong URL rather than at the first request.
        drop(store.pool.get().await?);
        Ok(store)
    }

    /// What every service does at start: connect, migrate, and relay this process's outbox
    /// to `broker` until `shutdown` (await the handle before closing the broker).
    pub async fn open(
        settings: &StoreSettings,
        broker: &herald_amqp::Broker,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        let store = Self::connect(settings, &broker.topology().status_exchange()).await?;
        store.migrate().await?;
        let relay = tokio::spawn({
            let store = store.clone();
            let publisher = broker.publisher();
            async move { store.relay_outbox(publisher, shutdown).await }
        });
        Ok((store, relay))
    }

    /// Applies the embedded migrations; concurrent callers (several services starting at
    /// once) serialise on an advisory lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let lock = client
            .prepare_cached("SELECT pg_advisory_lock(7236091001)")
            .await?;
        client.execute(&lock, &[]).await?;
        let client_ref: &mut tokio_postgres::Client = &mut client;
        let result = embedded::migrations::runner().run_async(client_ref).await;
        let unlock = client
            .prepare_cached("SELECT pg_advisory_unlock(7236091001)")
            .await?;
        client.execute(&unlock, &[]).await?;
        let report = result?;
        for migration in report.applied_migrations() {
            tracing::info!(migration = %migration, "applied migration");
        }
        Ok(())
    }

    /// The readiness of a service that needs this database and `broker`: what its admin
    /// listener's `/readyz` answers.
    pub fn ready_check(&self, broker: &herald_amqp::Broker) -> herald_telemetry::ReadyCheck {
        let (store, broker) = (self.clone(), broker.clone());
        std::sync::Arc::new(move || {
            let (store, broker) = (store.clone(), broker.clone());
            Box::pin(async move {
                let mut failing = Vec::new();
                if store.ping().await.is_err() {
                    failing.push("postgres".to_string());
                }
                if !broker.is_connected() {
                    failing.push("rabbitmq".to_string());
                }
                if failing.is_empty() {
                    Ok(Vec::new())
                } else {
                    Err(failing)
                }
            })
        })
    }

    /// Answers when the database does (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached("SELECT 1").await?;
        client.execute(&statement, &[]).await?;
        Ok(())
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }
}

/// Creates the database named in `url` if it does not exist (connecting to `postgres`).
/// Returns whether it was created.
pub async fn ensure_database(url: &str) -> Result<bool, StoreError> {
    let (admin, name) = admin_config(url)?;
    let (client, connection) = admin.connect(NoTls).await?;
    let task = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await?;
    }
    drop(client);
    let _ = task.await;
    Ok(!exists)
}

/// Drops the database named in `url` (test teardown).
pub async fn drop_database(url: &str) -> Result<(), StoreError> {
    let (admin, name) = admin_config(url)?;
    let (client, connection) = admin.connect(NoTls).await?;
    let task = tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&name)
        ))
        .await?;
    drop(client);
    let _ = task.await;
    Ok(())
}

fn admin_config(url: &str) -> Result<(tokio_postgres::Config, String), StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
    let name = config
        .get_dbname()
        .ok_or_else(|| StoreError::Config("the postgres URL names no database".into()))?
        .to_string();
    config.dbname("postgres");
    Ok((config, name))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
