//! `heraldctl recipients`: the recipient directory, straight in the database (the same rows
//! `/v1/recipients` manages).

use std::path::PathBuf;

use anyhow::{Context, bail};
use herald_store::{RecipientProfile, Store, mask};

use crate::{HeraldConfig, demo};

#[derive(clap::Subcommand)]
pub enum RecipientsCommand {
    /// Create or replace a recipient: from a JSON file (the `/v1/recipients` body) and/or flags.
    Put {
        user_id: String,
        #[command(flatten)]
        tenant: TenantArg,
        /// A JSON profile: {"timezone", "addresses", "preferences"}.
        #[arg(long)]
        file: Option<PathBuf>,
        /// IANA time zone, e.g. Asia/Shanghai.
        #[arg(long)]
        timezone: Option<String>,
        /// WeChat openid for an appid: APPID=OPENID (repeatable).
        #[arg(long = "openid", value_parser = parse_openid)]
        openids: Vec<(String, String)>,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        phone: Option<String>,
        /// Opt out of a channel (repeatable).
        #[arg(long = "opt-out-channel")]
        opt_out_channels: Vec<String>,
        /// Opt out of a template category (repeatable).
        #[arg(long = "opt-out-category")]
        opt_out_categories: Vec<String>,
    },
    /// Print a recipient as JSON.
    Get {
        user_id: String,
        #[command(flatten)]
        tenant: TenantArg,
    },
    /// Delete a recipient.
    Delete {
        user_id: String,
        #[command(flatten)]
        tenant: TenantArg,
    },
    /// List recipients in user id order (addresses masked).
    List {
        #[command(flatten)]
        tenant: TenantArg,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Start after this user id.
        #[arg(long)]
        after: Option<String>,
    },
}

#[derive(clap::Args)]
pub struct TenantArg {
    /// The tenant (default: the demo tenant).
    #[arg(long, default_value = demo::TENANT)]
    tenant: String,
}

fn parse_openid(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .filter(|(appid, openid)| !appid.is_empty() && !openid.is_empty())
        .map(|(appid, openid)| (appid.to_string(), openid.to_string()))
        .ok_or_else(|| "expected APPID=OPENID".to_string())
}

pub async fn run(config: &HeraldConfig, command: RecipientsCommand) -> anyhow::Result<()> {
    let store = Store::connect(&config.postgres, "").await?;
    match command {
        RecipientsCommand::Put {
            user_id,
            tenant,
            file,
            timezone,
            openids,
            email,
            phone,
            opt_out_channels,
            opt_out_categories,
        } => {
            let mut profile: RecipientProfile = match file {
                Some(path) => {
                    let text = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    herald_contract::decode_json(&text)
                        .with_context(|| format!("{} is not a recipient profile", path.display()))?
                }
                None => RecipientProfile::default(),
            };
            profile.user_id = user_id;
            profile.timezone = timezone.or(profile.timezone);
            profile.addresses.wechat_openids.extend(openids);
            profile.addresses.email = email.or(profile.addresses.email);
            profile.addresses.phone = phone.or(profile.addresses.phone);
            if !opt_out_channels.is_empty() {
                profile.preferences.opt_out_channels = Some(opt_out_channels);
            }
            if !opt_out_categories.is_empty() {
                profile.preferences.opt_out_categories = Some(opt_out_categories);
            }
            if let Err((field, message)) = profile.validate() {
                bail!("{field}: {message}");
            }
            let created = store.put_recipient(&tenant.tenant, &profile).await?;
            println!(
                "{} recipient {}",
                if created { "created" } else { "replaced" },
                profile.user_id
            );
        }
        RecipientsCommand::Get { user_id, tenant } => {
            let profile = store
                .recipient(&tenant.tenant, &user_id)
                .await?
                .with_context(|| format!("no recipient `{user_id}` in tenant {}", tenant.tenant))?;
            println!("{}", serde_json::to_string_pretty(&profile)?);
        }
        RecipientsCommand::Delete { user_id, tenant } => {
            if !store.delete_recipient(&tenant.tenant, &user_id).await? {
                bail!("no recipient `{user_id}` in tenant {}", tenant.tenant);
            }
            println!("deleted recipient {user_id}");
        }
        RecipientsCommand::List {
            tenant,
            limit,
            after,
        } => {
            let page = store
                .list_recipients(&tenant.tenant, after.as_deref(), limit.clamp(1, 1000))
                .await?;
            for profile in &page {
                let openids: Vec<String> = profile
                    .addresses
                    .wechat_openids
                    .iter()
                    .map(|(appid, openid)| format!("{appid}={}", mask(openid)))
                    .collect();
                println!(
                    "{:24} {:16} {}",
                    profile.user_id,
                    profile.timezone.as_deref().unwrap_or("-"),
                    openids.join(" ")
                );
            }
            if page.len() as i64 == limit
                && let Some(last) = page.last()
            {
                println!("(more: --after {})", last.user_id);
            }
        }
    }
    Ok(())
}
