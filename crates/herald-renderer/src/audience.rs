//! Who a request reaches: recipients named by directory user id are looked up (one query per
//! fan-out batch) and given their addresses; addresses given directly win over the
//! directory's.

use std::collections::BTreeMap;

use herald_contract::v1::Recipient;
use herald_store::{RecipientProfile, Store, StoreError};

/// One recipient of a batch, resolved.
pub enum Target {
    /// Reachable (as far as the directory tells): the recipient with its addresses filled in.
    Reachable {
        index: usize,
        recipient: Recipient,
        /// Boxed: most recipients of a large fan-out have none.
        profile: Option<Box<RecipientProfile>>,
    },
    /// A directory user that cannot be reached: unknown, or without an address for any of
    /// the channels. Suppressed with this reason, not a rejection of the whole request.
    Unreachable {
        index: usize,
        user_id: String,
        reason: &'static str,
        detail: String,
    },
}

/// The WeChat account a request sends from, and its appid (directory openids are per appid:
/// an openid is only valid for the account that issued it).
#[derive(Debug, Clone, Default)]
pub struct WechatAccount {
    pub account: Option<String>,
    pub app_id: Option<String>,
}

impl WechatAccount {
    /// The tenant's default account for the first of `wanted` that is addressed by openid
    /// (`wechat.template`, `wechat.subscribe`).
    pub async fn of(
        store: &Store,
        tenant: &str,
        wanted: &[String],
        uses_openid: impl Fn(&str) -> bool,
    ) -> Result<Self, StoreError> {
        let Some(channel) = wanted.iter().find(|c| uses_openid(c)) else {
            return Ok(Self::default());
        };
        let account = store.default_provider_account(tenant, channel).await?;
        let app_id = match &account {
            Some(account) => store.provider_account_app_id(account).await?,
            None => None,
        };
        Ok(Self { account, app_id })
    }

    fn openid(&self, profile: &RecipientProfile) -> Option<String> {
        let openids = &profile.addresses.wechat_openids;
        self.app_id
            .as_ref()
            .and_then(|appid| openids.get(appid))
            .or_else(|| self.account.as_ref().and_then(|a| openids.get(a)))
            .cloned()
    }
}

/// Fills a directory entry's addresses into `recipient` where the request gave none.
fn fill(recipient: &mut Recipient, profile: &RecipientProfile, wechat: &WechatAccount) {
    let set = |field: &mut String, value: Option<String>| {
        if field.is_empty()
            && let Some(value) = value
        {
            *field = value;
        }
    };
    let a = &profile.addresses;
    set(&mut recipient.wechat_openid, wechat.openid(profile));
    set(&mut recipient.email, a.email.clone());
    set(&mut recipient.phone, a.phone.clone());
    set(&mut recipient.wecom_userid, a.wecom_userid.clone());
    set(&mut recipient.webhook_url, a.webhook_url.clone());
    set(&mut recipient.dingtalk_robot, a.dingtalk_robot.clone());
    set(&mut recipient.feishu_robot, a.feishu_robot.clone());
}

/// Resolves `recipients` (the batch starting at request index `offset`). `reachable` says
/// whether a recipient has an address for one of the wanted channels.
pub async fn resolve(
    store: &Store,
    tenant: &str,
    recipients: &[Recipient],
    offset: usize,
    wechat: &WechatAccount,
    reachable: impl Fn(&Recipient) -> bool,
) -> Result<Vec<Target>, StoreError> {
    let ids: Vec<String> = recipients
        .iter()
        .filter(|r| !r.user_id.is_empty())
        .map(|r| r.user_id.clone())
        .collect();
    let profiles: BTreeMap<String, RecipientProfile> =
        store.recipients_by_ids(tenant, &ids).await?;
    Ok(recipients
        .iter()
        .enumerate()
        .map(|(i, recipient)| {
            let index = offset + i;
            if recipient.user_id.is_empty() {
                return Target::Reachable {
                    index,
                    recipient: recipient.clone(),
                    profile: None,
                };
            }
            let mut filled = recipient.clone();
            let profile = profiles.get(&recipient.user_id).cloned();
            if let Some(profile) = &profile {
                fill(&mut filled, profile, wechat);
            }
            if reachable(&filled) {
                return Target::Reachable {
                    index,
                    recipient: filled,
                    profile: profile.map(Box::new),
                };
            }
            let (reason, detail) = match profile {
                None => (
                    "unknown_recipient",
                    format!("no recipient `{}` in the directory", recipient.user_id),
                ),
                Some(_) => (
                    "no_address",
                    format!(
                        "recipient `{}` has no address for the requested channels",
                        recipient.user_id
                    ),
                ),
            };
            Target::Unreachable {
                index,
                user_id: recipient.user_id.clone(),
                reason,
                detail,
            }
        })
        .collect())
}
