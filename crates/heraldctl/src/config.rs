//! The whole deployment's configuration in one struct: what `heraldctl` reads, and what it
//! hands each service it starts in-process.

use herald_amqp::AmqpSettings;
use herald_callback::{CallbackConfig, CallbackSettings};
use herald_config::TokenServiceClientSettings;
use herald_ingress::{IngressConfig, IngressSettings};
use herald_renderer::{RendererConfig, RendererSettings};
use herald_sandbox::SandboxConfig;
use herald_sender::{SenderConfig, SenderSettings};
use herald_store::StoreSettings;
use herald_telemetry::TelemetrySettings;
use herald_token::TokenServiceConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct HeraldConfig {
    pub amqp: AmqpSettings,
    pub postgres: StoreSettings,
    pub telemetry: TelemetrySettings,
    pub ingress: IngressSettings,
    pub renderer: RendererSettings,
    pub callback: CallbackSettings,
    pub sender: SenderSettings,
    /// The token service itself.
    pub token: TokenServiceConfig,
    /// How the other services reach the token service.
    pub token_service: TokenServiceClientSettings,
    pub sandbox: SandboxConfig,
    /// Tests only: the stack starts no renderer; the test starts its own
    /// ([`crate::Stack::spawn_renderer`]) to stop one mid-fan-out.
    #[serde(skip)]
    pub external_renderer: bool,
}

impl HeraldConfig {
    /// Adds the demo WeChat account (token credentials and callback token, matching the
    /// sandbox's demo app) unless the configuration already has one of that id.
    pub fn with_demo_account(mut self) -> Self {
        use crate::demo;
        self.token
            .accounts
            .entry(demo::ACCOUNT.to_string())
            .or_insert_with(|| herald_token::AccountConfig {
                kind: herald_token::AccountKind::WechatOfficialAccount,
                appid: demo::APPID.into(),
                secret: Some(herald_sandbox::SandboxApp::demo().secret),
                secret_file: None,
                agent_id: None,
                base_url: "http://127.0.0.1:8099".into(),
                token_endpoint: herald_token::TokenEndpoint::Stable,
            });
        self.token
            .accounts
            .entry(demo::WECOM_ACCOUNT.to_string())
            .or_insert_with(|| herald_token::AccountConfig {
                kind: herald_token::AccountKind::WecomApp,
                appid: demo::WECOM_CORPID.into(),
                secret: Some("demo-wecom-secret".into()),
                agent_id: Some(demo::WECOM_AGENT_ID.to_string()),
                base_url: "http://127.0.0.1:8099".into(),
                ..Default::default()
            });
        self.sender
            .accounts
            .entry(demo::WECOM_ACCOUNT.to_string())
            .or_default()
            .agent_id
            .get_or_insert(demo::WECOM_AGENT_ID);
        // The sandbox's demo robots (the Stack points them at its own address).
        for robot in herald_sandbox::SandboxRobot::demo() {
            let (id, url) = match robot.kind {
                herald_sandbox::RobotKind::Wecom => (
                    demo::WECOM_ROBOT,
                    format!(
                        "http://127.0.0.1:8099/cgi-bin/webhook/send?key={}",
                        robot.token
                    ),
                ),
                herald_sandbox::RobotKind::Dingtalk => (
                    demo::DINGTALK_ROBOT,
                    format!(
                        "http://127.0.0.1:8099/robot/send?access_token={}",
                        robot.token
                    ),
                ),
                herald_sandbox::RobotKind::Feishu => (
                    demo::FEISHU_ROBOT,
                    format!(
                        "http://127.0.0.1:8099/open-apis/bot/v2/hook/{}",
                        robot.token
                    ),
                ),
            };
            self.sender.robots.entry(id.to_string()).or_insert(
                herald_sender::channels::robots::RobotSettings {
                    url,
                    secret: robot.secret,
                },
            );
        }
        // A local relay without TLS (tests point it at their own sink).
        self.sender
            .smtp
            .entry(demo::EMAIL_ACCOUNT.to_string())
            .or_insert_with(|| herald_sender::channels::email::SmtpSettings {
                host: "127.0.0.1".into(),
                port: Some(demo::EMAIL_RELAY_PORT),
                tls: herald_sender::channels::email::SmtpTls::None,
                from: demo::EMAIL_FROM.into(),
                timeout_ms: 5_000,
                ..Default::default()
            });
        self.sender
            .webhooks
            .entry(demo::WEBHOOK_ACCOUNT.to_string())
            .or_insert_with(
                || herald_sender::channels::webhook::WebhookAccountSettings {
                    secrets: vec![demo::WEBHOOK_SECRET.into()],
                    ..Default::default()
                },
            );
        // The sandbox's demo SMS accounts, and their receipts (the Stack points the sandbox's
        // receipt URLs at the callback receiver).
        for account in herald_sandbox::SandboxSmsAccount::demo() {
            let (id, provider, receipts, token) = match account.provider {
                herald_sandbox::SmsProvider::TencentSms => (
                    demo::SMS_TENCENT_ACCOUNT,
                    herald_sender::channels::sms::SmsProvider::TencentSms,
                    herald_callback::sms::SmsReceiptProvider::TencentSms,
                    demo::SMS_TENCENT_RECEIPT_TOKEN,
                ),
                herald_sandbox::SmsProvider::AliyunSms => (
                    demo::SMS_ALIYUN_ACCOUNT,
                    herald_sender::channels::sms::SmsProvider::AliyunSms,
                    herald_callback::sms::SmsReceiptProvider::AliyunSms,
                    demo::SMS_ALIYUN_RECEIPT_TOKEN,
                ),
            };
            self.sender.sms.entry(id.to_string()).or_insert_with(|| {
                herald_sender::channels::sms::SmsAccountSettings {
                    provider: Some(provider),
                    key_id: account.key_id.clone(),
                    key_secret: account.key_secret.clone(),
                    base_url: "http://127.0.0.1:8099".into(),
                    region: String::new(),
                    sdk_app_id: account.sdk_app_id.clone(),
                    sign_name: account.sign_names.first().cloned().unwrap_or_default(),
                    number_rate_limit: None,
                }
            });
            self.callback.sms.entry(id.to_string()).or_insert_with(|| {
                herald_callback::SmsCallbackAccount {
                    provider: receipts,
                    token: token.into(),
                }
            });
        }
        self.callback
            .wechat
            .entry(demo::ACCOUNT.to_string())
            .or_insert_with(|| herald_callback::WechatCallbackAccount {
                token: herald_sandbox::SandboxApp::demo().callback_token,
                appid: demo::APPID.into(),
                encoding_aes_key: None,
            });
        self
    }

    pub fn renderer(&self) -> RendererConfig {
        RendererConfig {
            amqp: self.amqp.clone(),
            postgres: self.postgres.clone(),
            telemetry: self.telemetry.clone(),
            renderer: self.renderer.clone(),
        }
    }

    pub fn sender(&self) -> SenderConfig {
        SenderConfig {
            amqp: self.amqp.clone(),
            postgres: self.postgres.clone(),
            telemetry: self.telemetry.clone(),
            token_service: self.token_service.clone(),
            sender: self.sender.clone(),
        }
    }

    pub fn ingress(&self) -> IngressConfig {
        IngressConfig {
            amqp: self.amqp.clone(),
            postgres: self.postgres.clone(),
            telemetry: self.telemetry.clone(),
            ingress: self.ingress.clone(),
        }
    }

    pub fn callback(&self) -> CallbackConfig {
        CallbackConfig {
            amqp: self.amqp.clone(),
            postgres: self.postgres.clone(),
            telemetry: self.telemetry.clone(),
            callback: self.callback.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_loads_and_matches_the_defaults() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/herald.example.toml"
        );
        let loaded: HeraldConfig = herald_config::load_with_env(
            Some(std::path::Path::new(path)),
            Some(Default::default()),
        )
        .expect("deploy/herald.example.toml loads");
        let defaults = HeraldConfig::default();
        assert_eq!(loaded.amqp.url, defaults.amqp.url);
        assert_eq!(loaded.amqp.retry_tiers, defaults.amqp.retry_tiers);
        assert_eq!(loaded.postgres.url, defaults.postgres.url);
        assert_eq!(loaded.sender.max_attempts, defaults.sender.max_attempts);
        assert_eq!(
            loaded.token.redis.key_prefix,
            defaults.token.redis.key_prefix
        );
        assert_eq!(loaded.callback.listen, defaults.callback.listen);
        assert!(
            loaded.token.accounts.is_empty(),
            "no account unless configured"
        );
    }

    #[test]
    fn the_demo_account_is_added_only_when_absent() {
        let config = HeraldConfig::default().with_demo_account();
        assert!(config.token.accounts.contains_key(crate::demo::ACCOUNT));
        assert!(config.callback.wechat.contains_key(crate::demo::ACCOUNT));
    }
}
