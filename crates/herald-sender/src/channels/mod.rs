//! Every channel the sender can serve, each in its module.

pub mod email;
pub mod robots;
pub mod sms;
pub mod webhook;
pub mod wechat;
pub mod wecom;

use std::sync::Arc;

use herald_contract::channels;
use herald_token::client::TokenClient;

use crate::SenderSettings;
use crate::channel::Channel;

/// What channels share: one pooled HTTP client and the token service client.
#[derive(Clone)]
pub struct Shared {
    pub http: reqwest::Client,
    pub tokens: Arc<TokenClient>,
}

/// Builds the channel named `name` from the settings.
pub fn build(
    name: &str,
    settings: &SenderSettings,
    shared: &Shared,
) -> Result<Arc<dyn Channel>, String> {
    match name {
        channels::WECHAT_TEMPLATE => Ok(Arc::new(wechat::Wechat::new(
            shared.clone(),
            settings,
            wechat::Api::Template,
        ))),
        channels::WECHAT_SUBSCRIBE => Ok(Arc::new(wechat::Wechat::new(
            shared.clone(),
            settings,
            wechat::Api::Subscribe,
        ))),
        channels::WECOM => Ok(Arc::new(wecom::Wecom::new(shared.clone(), settings))),
        channels::WECOM_ROBOT => Ok(Arc::new(robots::Robots::new(
            shared.http.clone(),
            robots::Kind::Wecom,
            settings.robots.clone(),
        ))),
        channels::DINGTALK => Ok(Arc::new(robots::Robots::new(
            shared.http.clone(),
            robots::Kind::Dingtalk,
            settings.robots.clone(),
        ))),
        channels::FEISHU => Ok(Arc::new(robots::Robots::new(
            shared.http.clone(),
            robots::Kind::Feishu,
            settings.robots.clone(),
        ))),
        channels::EMAIL => Ok(Arc::new(email::Email::new(&settings.smtp)?)),
        channels::WEBHOOK => Ok(Arc::new(webhook::Webhooks::new(settings)?)),
        channels::SMS => Ok(Arc::new(sms::Sms::new(shared.http.clone(), &settings.sms)?)),
        other => Err(format!("sender.channels: unknown channel `{other}`")),
    }
}
