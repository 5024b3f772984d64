//! The template registry: immutable versions per template, and a published pointer.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{OutboxMessage, Store, StoreError};

/// One template version (the published one, unless a version was asked for).
#[derive(Debug, Clone)]
pub struct TemplateRecord {
    pub id: String,
    pub version: i32,
    pub definition: serde_json::Value,
}

/// A template in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateSummary {
    pub id: String,
    pub description: String,
    pub category: String,
    pub published_version: Option<i32>,
    pub latest_version: i32,
    pub updated_at: DateTime<Utc>,
}

/// One stored version of a template.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateVersion {
    pub version: i32,
    pub published: bool,
    pub created_at: DateTime<Utc>,
    pub definition: serde_json::Value,
}

/// A template with all its versions, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateHistory {
    pub id: String,
    pub published_version: Option<i32>,
    pub versions: Vec<TemplateVersion>,
}

/// What storing a definition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionCreated {
    /// A new version with this number.
    New(i32),
    /// The latest version already has this definition: nothing stored.
    Unchanged(i32),
}

impl VersionCreated {
    pub fn version(self) -> i32 {
        match self {
            VersionCreated::New(v) | VersionCreated::Unchanged(v) => v,
        }
    }
}

impl Store {
    /// Stores `definition` as the next immutable version of a template, unless the latest
    /// version already holds it (so applying the same file twice stores nothing).
    pub async fn create_template_version(
        &self,
        tenant: &str,
        id: &str,
        definition: &serde_json::Value,
    ) -> Result<VersionCreated, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let ensure = tx
            .prepare_cached(
                "INSERT INTO templates (tenant_id, id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .await?;
        tx.execute(&ensure, &[&tenant, &id]).await?;
        // The row lock serialises concurrent creates of one template.
        let lock = tx
            .prepare_cached("SELECT 1 FROM templates WHERE tenant_id = $1 AND id = $2 FOR UPDATE")
            .await?;
        tx.execute(&lock, &[&tenant, &id]).await?;
        let select_latest = tx
            .prepare_cached(
                "SELECT version, definition FROM template_versions
                 WHERE tenant_id = $1 AND template_id = $2 ORDER BY version DESC LIMIT 1",
            )
            .await?;
        let latest = tx.query_opt(&select_latest, &[&tenant, &id]).await?;
        let next = match latest {
            Some(row) => {
                let version: i32 = row.get(0);
                let existing: serde_json::Value = row.get(1);
                if &existing == definition {
                    tx.commit().await?;
                    return Ok(VersionCreated::Unchanged(version));
                }
                version + 1
            }
            None => 1,
        };
        let insert = tx
            .prepare_cached(
                "INSERT INTO template_versions (tenant_id, template_id, version, definition)
                 VALUES ($1, $2, $3, $4)",
            )
            .await?;
        tx.execute(&insert, &[&tenant, &id, &next, definition])
            .await?;
        tx.commit().await?;
        Ok(VersionCreated::New(next))
    }

    /// Points the template at `version`. `announce` (the control message telling renderers
    /// to drop their cached copy) is written to the outbox in the same transaction when the
    /// pointer moves. `None` when the template has no such version; else whether it moved.
    pub async fn publish_template_version(
        &self,
        tenant: &str,
        id: &str,
        version: i32,
        announce: Option<&OutboxMessage>,
    ) -> Result<Option<bool>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let select_version = tx
            .prepare_cached(
                "SELECT 1 FROM template_versions
                 WHERE tenant_id = $1 AND template_id = $2 AND version = $3",
            )
            .await?;
        let exists = tx
            .query_opt(&select_version, &[&tenant, &id, &version])
            .await?
            .is_some();
        if !exists {
            return Ok(None);
        }
        let publish = tx
            .prepare_cached(
                "UPDATE templates SET published_version = $3
                 WHERE tenant_id = $1 AND id = $2 AND published_version IS DISTINCT FROM $3",
            )
            .await?;
        let moved = tx.execute(&publish, &[&tenant, &id, &version]).await? > 0;
        if moved && let Some(message) = announce {
            Self::insert_outbox(&tx, message).await?;
        }
        tx.commit().await?;
        if moved && announce.is_some() {
            self.outbox_written();
        }
        Ok(Some(moved))
    }

    /// Stores `definition` (unless unchanged) and publishes it, announcing nothing: for
    /// seeding before any renderer runs. Returns the published version.
    pub async fn publish_template(
        &self,
        tenant: &str,
        id: &str,
        definition: &serde_json::Value,
    ) -> Result<i32, StoreError> {
        let version = self
            .create_template_version(tenant, id, definition)
            .await?
            .version();
        self.publish_template_version(tenant, id, version, None)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("template {id} version {version}")))?;
        Ok(version)
    }

    /// A template version: the published one when `version` is `None`.
    pub async fn template(
        &self,
        tenant: &str,
        id: &str,
        version: Option<i32>,
    ) -> Result<Option<TemplateRecord>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT v.version, v.definition FROM templates t
                 JOIN template_versions v ON v.tenant_id = t.tenant_id AND v.template_id = t.id
                 WHERE t.tenant_id = $1 AND t.id = $2
                   AND v.version = COALESCE($3, t.published_version)",
            )
            .await?;
        let row = client
            .query_opt(&statement, &[&tenant, &id, &version])
            .await?;
        Ok(row.map(|r| TemplateRecord {
            id: id.to_string(),
            version: r.get(0),
            definition: r.get(1),
        }))
    }

    /// A tenant's templates, by id, described by their latest version.
    pub async fn list_templates(&self, tenant: &str) -> Result<Vec<TemplateSummary>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT t.id, t.published_version, v.version, v.created_at,
                        COALESCE(v.definition->>'description', ''),
                        COALESCE(v.definition->>'category', '')
                 FROM templates t
                 JOIN LATERAL (SELECT version, created_at, definition FROM template_versions
                               WHERE tenant_id = t.tenant_id AND template_id = t.id
                               ORDER BY version DESC LIMIT 1) v ON true
                 WHERE t.tenant_id = $1
                 ORDER BY t.id",
            )
            .await?;
        let rows = client.query(&statement, &[&tenant]).await?;
        Ok(rows
            .iter()
            .map(|r| TemplateSummary {
                id: r.get(0),
                published_version: r.get(1),
                latest_version: r.get(2),
                updated_at: r.get(3),
                description: r.get(4),
                category: r.get(5),
            })
            .collect())
    }

    /// A template with every version, newest first; `None` when the tenant has no such template.
    pub async fn template_history(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<TemplateHistory>, StoreError> {
        let client = self.client().await?;
        let select_template = client
            .prepare_cached(
                "SELECT published_version FROM templates WHERE tenant_id = $1 AND id = $2",
            )
            .await?;
        let Some(template) = client.query_opt(&select_template, &[&tenant, &id]).await? else {
            return Ok(None);
        };
        let published_version: Option<i32> = template.get(0);
        let select_versions = client
            .prepare_cached(
                "SELECT version, created_at, definition FROM template_versions
                 WHERE tenant_id = $1 AND template_id = $2 ORDER BY version DESC",
            )
            .await?;
        let versions = client
            .query(&select_versions, &[&tenant, &id])
            .await?
            .iter()
            .map(|r| {
                let version: i32 = r.get(0);
                TemplateVersion {
                    version,
                    published: published_version == Some(version),
                    created_at: r.get(1),
                    definition: r.get(2),
                }
            })
            .collect();
        Ok(Some(TemplateHistory {
            id: id.to_string(),
            published_version,
            versions,
        }))
    }
}
