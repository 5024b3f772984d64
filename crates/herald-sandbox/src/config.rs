//! Sandbox configuration: the `[sandbox]` section of `herald.toml`.

use serde::{Deserialize, Serialize};

/// How the sandbox listens and behaves. Every field has a default, so an empty section works.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxConfig {
    pub listen: String,
    pub apps: Vec<SandboxApp>,
    /// Delay between a successful send and its TEMPLATESENDJOBFINISH callback.
    pub callback_delay_ms: u64,
    /// Lifetime of an access token (`expires_in`).
    pub token_ttl_secs: u64,
    /// How long a superseded token keeps working (WeChat: 5 minutes). Tests set 0.
    pub token_grace_secs: u64,
    /// stable_token hands out the same token until less than this is left (WeChat: 5 minutes),
    /// so its `expires_in` is never below this. Tests with a short `token_ttl_secs` shrink it.
    pub stable_reissue_window_secs: u64,
    /// How long WeChat waits for the callback receiver before counting the attempt as failed.
    pub callback_timeout_ms: u64,
    /// Callback attempts in all (WeChat: 3).
    pub callback_attempts: u32,
    /// Pause between callback attempts (shorter than WeChat's, to keep the dev loop quick).
    pub callback_retry_interval_ms: u64,
    /// DingTalk and Feishu group robots.
    pub robots: Vec<crate::robots::SandboxRobot>,
    /// WeCom organisations and their applications.
    pub wecom_corps: Vec<crate::wecom::SandboxCorp>,
    /// Tencent Cloud SMS and Aliyun SMS accounts.
    pub sms_accounts: Vec<crate::sms::SandboxSmsAccount>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8099".into(),
            apps: vec![SandboxApp::demo()],
            callback_delay_ms: 200,
            token_ttl_secs: 7200,
            token_grace_secs: 300,
            stable_reissue_window_secs: 300,
            callback_timeout_ms: 5000,
            callback_attempts: 3,
            callback_retry_interval_ms: 1000,
            robots: crate::robots::SandboxRobot::demo(),
            wecom_corps: vec![crate::wecom::SandboxCorp::demo()],
            sms_accounts: crate::sms::SandboxSmsAccount::demo(),
        }
    }
}

/// One Official Account known to the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxApp {
    pub appid: String,
    pub secret: String,
    /// `gh_…` id, sent as `ToUserName` in callbacks.
    pub original_id: String,
    /// Where TEMPLATESENDJOBFINISH is POSTed (plain mode); `None` sends no callbacks.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// The "Token" of WeChat's server configuration, used to sign callbacks.
    pub callback_token: String,
    /// How callbacks are sent: `plain` (default), `compatible` (plaintext and `Encrypt`) or
    /// `safe` (only `Encrypt`), as chosen in WeChat's server configuration.
    #[serde(default)]
    pub callback_mode: CallbackMode,
    /// The EncodingAESKey (43 characters) for compatible and safe mode.
    #[serde(default)]
    pub encoding_aes_key: Option<String>,
    /// Templates that exist for this app.
    #[serde(default)]
    pub templates: Vec<SandboxTemplate>,
    /// Subscribe message templates; keys are named by field type and number (`thing1`).
    #[serde(default)]
    pub subscribe_templates: Vec<SandboxTemplate>,
}

impl SandboxApp {
    /// The demo account the dev stack is wired to out of the box.
    pub fn demo() -> Self {
        Self {
            appid: "wxdemo0000000001".into(),
            secret: "demo-secret".into(),
            original_id: "gh_demo00000001".into(),
            callback_url: Some("http://127.0.0.1:8094/v1/callbacks/wechat/demo-oa".into()),
            callback_token: "demo-callback-token".into(),
            callback_mode: CallbackMode::Plain,
            encoding_aes_key: None,
            templates: vec![SandboxTemplate {
                template_id: "tmpl_order_shipped".into(),
                keys: vec!["order_id".into(), "carrier".into(), "eta".into()],
            }],
            subscribe_templates: vec![SandboxTemplate {
                // As in examples/templates/order_shipped.yaml.
                template_id: "sub_order_shipped".into(),
                keys: vec!["character_string1".into(), "thing2".into(), "thing3".into()],
            }],
        }
    }
}

/// WeChat's message encryption modes for server callbacks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallbackMode {
    #[default]
    Plain,
    Compatible,
    Safe,
}

/// A template and the data keys it declares.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxTemplate {
    pub template_id: String,
    #[serde(default)]
    pub keys: Vec<String>,
}
