//! The recipient directory (a tenant's user id → addresses and preferences) and the tenant's
//! default preferences. The renderer resolves `Recipient.user_id` here; the ingress API and
//! `heraldctl recipients` manage it.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError};

/// A recipient's addresses, per channel and provider account. Absent means "none".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Addresses {
    /// WeChat openid per Official Account appid (an openid only works for its own appid).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub wechat_openids: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wechat_unionid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wecom_userid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dingtalk_robot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feishu_robot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

/// Quiet hours: local wall-clock times in the recipient's time zone. A window whose end is
/// before its start runs over midnight (`22:00`–`08:00`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

/// At most `max` deliveries per recipient within `window` (`30m`, `24h`), counted per
/// `category` or per `template` when one is named, else over everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    pub max: u32,
    pub window: String,
}

/// Preferences; a tenant's are the defaults and a recipient's override them field by field
/// (a field the recipient leaves out is the tenant's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Preferences {
    /// IANA time zone (`Asia/Shanghai`) for quiet hours; the recipient's own `timezone`
    /// wins over it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Channels the recipient opted out of (`wechat.template`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opt_out_channels: Option<Vec<String>>,
    /// Template categories the recipient opted out of (`marketing`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opt_out_categories: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<QuietHours>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_caps: Option<Vec<FrequencyCap>>,
    /// The same template with the same rendered content to the same recipient within this
    /// window (`10m`) is suppressed as a duplicate. `0s` turns it off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_window: Option<String>,
}

impl Preferences {
    /// `self` (a recipient's) over `defaults` (the tenant's).
    pub fn over(&self, defaults: &Preferences) -> Preferences {
        Preferences {
            timezone: self.timezone.clone().or_else(|| defaults.timezone.clone()),
            opt_out_channels: self
                .opt_out_channels
                .clone()
                .or_else(|| defaults.opt_out_channels.clone()),
            opt_out_categories: self
                .opt_out_categories
                .clone()
                .or_else(|| defaults.opt_out_categories.clone()),
            quiet_hours: self
                .quiet_hours
                .clone()
                .or_else(|| defaults.quiet_hours.clone()),
            frequency_caps: self
                .frequency_caps
                .clone()
                .or_else(|| defaults.frequency_caps.clone()),
            dedup_window: self
                .dedup_window
                .clone()
                .or_else(|| defaults.dedup_window.clone()),
        }
    }

    /// Checks what serde cannot: time zones and windows. Names the field at fault.
    pub fn validate(&self, field: &str) -> Result<(), (String, String)> {
        if let Some(tz) = &self.timezone
            && tz.parse::<chrono_tz::Tz>().is_err()
        {
            return Err((
                format!("{field}.timezone"),
                format!("unknown time zone `{tz}`"),
            ));
        }
        for (index, cap) in self.frequency_caps.iter().flatten().enumerate() {
            let at = format!("{field}.frequency_caps[{index}]");
            if herald_amqp::parse_delay(&cap.window).is_none_or(|w| w.is_zero()) {
                return Err((
                    format!("{at}.window"),
                    "must be a duration such as 30m or 24h".into(),
                ));
            }
            if cap.category.is_some() && cap.template.is_some() {
                return Err((at, "name a category or a template, not both".into()));
            }
        }
        if let Some(window) = &self.dedup_window
            && herald_amqp::parse_delay(window).is_none()
        {
            return Err((
                format!("{field}.dedup_window"),
                "must be a duration such as 10m".into(),
            ));
        }
        Ok(())
    }
}

/// One directory entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecipientProfile {
    /// The tenant's own id for the person; set from the path on `PUT`.
    pub user_id: String,
    /// IANA time zone of the recipient (quiet hours are in it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    pub addresses: Addresses,
    pub preferences: Preferences,
    /// Set by the store; accepted and ignored in a body, so what `GET` shows can be `PUT` back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

impl RecipientProfile {
    /// Checks a profile before storing it; names the field at fault.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.user_id.trim().is_empty() || self.user_id.len() > 256 {
            return Err(("user_id".into(), "must be 1 to 256 characters".into()));
        }
        if let Some(tz) = &self.timezone
            && tz.parse::<chrono_tz::Tz>().is_err()
        {
            return Err(("timezone".into(), format!("unknown time zone `{tz}`")));
        }
        self.preferences.validate("preferences")
    }
}

/// Shows the first and last few characters of an address (`oDem…01x`), for logs: a full
/// address never goes to a log line.
pub fn mask(address: &str) -> String {
    let chars: Vec<char> = address.chars().collect();
    if chars.len() <= 6 {
        return "…".into();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 3..].iter().collect();
    format!("{head}…{tail}")
}

fn profile_of(row: &tokio_postgres::Row) -> RecipientProfile {
    RecipientProfile {
        user_id: row.get(0),
        timezone: row.get(1),
        addresses: serde_json::from_value(row.get(2)).unwrap_or_default(),
        preferences: serde_json::from_value(row.get(3)).unwrap_or_default(),
        updated_at: Some(row.get(4)),
    }
}

impl Store {
    /// Creates or replaces a directory entry; returns whether it was new.
    pub async fn put_recipient(
        &self,
        tenant: &str,
        profile: &RecipientProfile,
    ) -> Result<bool, StoreError> {
        let addresses = serde_json::to_value(&profile.addresses).unwrap_or_default();
        let preferences = serde_json::to_value(&profile.preferences).unwrap_or_default();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO recipients (tenant_id, user_id, timezone, addresses, preferences)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (tenant_id, user_id) DO UPDATE
                   SET timezone = EXCLUDED.timezone, addresses = EXCLUDED.addresses,
                       preferences = EXCLUDED.preferences, updated_at = now()
                 RETURNING (xmax = 0)",
            )
            .await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &tenant,
                    &profile.user_id,
                    &profile.timezone,
                    &addresses,
                    &preferences,
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    pub async fn recipient(
        &self,
        tenant: &str,
        user_id: &str,
    ) -> Result<Option<RecipientProfile>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT user_id, timezone, addresses, preferences, updated_at FROM recipients
                 WHERE tenant_id = $1 AND user_id = $2",
            )
            .await?;
        let row = client.query_opt(&statement, &[&tenant, &user_id]).await?;
        Ok(row.as_ref().map(profile_of))
    }

    /// The directory entries of `user_ids` that exist (one query per fan-out batch).
    pub async fn recipients_by_ids(
        &self,
        tenant: &str,
        user_ids: &[String],
    ) -> Result<BTreeMap<String, RecipientProfile>, StoreError> {
        if user_ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT user_id, timezone, addresses, preferences, updated_at FROM recipients
                 WHERE tenant_id = $1 AND user_id = ANY($2)",
            )
            .await?;
        let rows = client.query(&statement, &[&tenant, &user_ids]).await?;
        Ok(rows
            .iter()
            .map(profile_of)
            .map(|p| (p.user_id.clone(), p))
            .collect())
    }

    /// Deletes a directory entry; returns whether there was one.
    pub async fn delete_recipient(&self, tenant: &str, user_id: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("DELETE FROM recipients WHERE tenant_id = $1 AND user_id = $2")
            .await?;
        Ok(client.execute(&statement, &[&tenant, &user_id]).await? > 0)
    }

    /// A page of the directory in user id order, after `after`.
    pub async fn list_recipients(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RecipientProfile>, StoreError> {
        // Not cached: the optional `after` (`$2 IS NULL OR ...`) wants a plan per call; a
        // generic plan could not use it as an index bound.
        let rows = self
            .client()
            .await?
            .query(
                "SELECT user_id, timezone, addresses, preferences, updated_at FROM recipients
                 WHERE tenant_id = $1 AND ($2::text IS NULL OR user_id > $2)
                 ORDER BY user_id LIMIT $3",
                &[&tenant, &after, &limit],
            )
            .await?;
        Ok(rows.iter().map(profile_of).collect())
    }

    /// The tenant's default preferences (empty when never set).
    pub async fn tenant_preferences(&self, tenant: &str) -> Result<Preferences, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT preferences FROM tenant_preferences WHERE tenant_id = $1")
            .await?;
        let row = client.query_opt(&statement, &[&tenant]).await?;
        Ok(row
            .and_then(|r| serde_json::from_value(r.get(0)).ok())
            .unwrap_or_default())
    }

    pub async fn put_tenant_preferences(
        &self,
        tenant: &str,
        preferences: &Preferences,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_value(preferences).unwrap_or_default();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO tenant_preferences (tenant_id, preferences) VALUES ($1, $2)
                 ON CONFLICT (tenant_id) DO UPDATE
                   SET preferences = EXCLUDED.preferences, updated_at = now()",
            )
            .await?;
        client.execute(&statement, &[&tenant, &json]).await?;
        Ok(())
    }

    /// The appid of a provider account (directory openids are kept per appid).
    pub async fn provider_account_app_id(
        &self,
        account: &str,
    ) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT app_id FROM provider_accounts WHERE id = $1")
            .await?;
        let row = client.query_opt(&statement, &[&account]).await?;
        Ok(row.map(|r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_addresses() {
        assert_eq!(mask("oDemoUser000000000000000001x"), "oDe…01x");
        assert_eq!(mask("short"), "…");
    }

    #[test]
    fn recipient_preferences_override_the_tenant_field_by_field() {
        let tenant = Preferences {
            timezone: Some("Asia/Shanghai".into()),
            opt_out_categories: Some(vec!["marketing".into()]),
            dedup_window: Some("10m".into()),
            ..Default::default()
        };
        let mine = Preferences {
            opt_out_categories: Some(vec![]),
            ..Default::default()
        };
        let merged = mine.over(&tenant);
        assert_eq!(merged.opt_out_categories, Some(vec![]));
        assert_eq!(merged.timezone.as_deref(), Some("Asia/Shanghai"));
        assert_eq!(merged.dedup_window.as_deref(), Some("10m"));
    }

    #[test]
    fn validation_names_the_field() {
        let profile: RecipientProfile = serde_json::from_value(serde_json::json!({
            "user_id": "u1",
            "preferences": {"frequency_caps": [{"max": 1, "window": "soon"}]}
        }))
        .expect("decodes");
        assert_eq!(
            profile.validate().expect_err("bad window").0,
            "preferences.frequency_caps[0].window"
        );
        let bad_tz = RecipientProfile {
            user_id: "u1".into(),
            timezone: Some("Mars/Base".into()),
            ..Default::default()
        };
        assert_eq!(bad_tz.validate().expect_err("bad tz").0, "timezone");
        let quiet: Preferences = serde_json::from_value(
            serde_json::json!({"quiet_hours": {"start": "22:00:00", "end": "08:00:00"}}),
        )
        .expect("quiet hours decode");
        assert!(quiet.quiet_hours.is_some());
    }
}
