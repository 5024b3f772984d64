//! Configuration of the token service (`[token]` section of `herald.toml`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole configuration file as the binary loads it: only the `[token]` section matters here.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenFile {
    pub token: TokenServiceConfig,
    pub telemetry: herald_telemetry::TelemetrySettings,
}

/// Settings of one token-service process.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenServiceConfig {
    /// Address the HTTP API listens on.
    pub listen: String,
    /// Bearer secret that callers must present on every `/v1` route.
    pub auth_token: String,
    pub redis: herald_config::RedisSettings,
    /// Share of a token's lifetime after which the background task refreshes it (0 < x < 1).
    pub refresh_at: f64,
    /// Accounts by the name callers use in `/v1/tokens/{account}`.
    pub accounts: BTreeMap<String, AccountConfig>,
}

impl Default for TokenServiceConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8091".into(),
            auth_token: "dev-internal-token".into(),
            redis: herald_config::RedisSettings::default(),
            refresh_at: 0.8,
            // No accounts by default: a map default would merge into every deployment's
            // configuration. `heraldctl up` adds the demo account.
            accounts: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for TokenServiceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenServiceConfig")
            .field("listen", &self.listen)
            .field("auth_token", &"<redacted>")
            .field("redis_url", &redact_url(&self.redis.url))
            .field("redis_key_prefix", &self.redis.key_prefix)
            .field("refresh_at", &self.refresh_at)
            .field("accounts", &self.accounts)
            .finish()
    }
}

/// A URL fit for logs: any password in it is replaced.
pub(crate) fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // Only fails for URLs that cannot have credentials, which this one has.
                let _ = parsed.set_password(Some("redacted"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable url>".into(),
    }
}

/// Which provider API an account belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    #[default]
    WechatOfficialAccount,
    WechatMiniProgram,
    WecomApp,
}

/// Which WeChat token endpoint to use (WeCom accounts always use `/cgi-bin/gettoken`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenEndpoint {
    /// `POST /cgi-bin/stable_token`: another system sharing the appid cannot knock our token out.
    #[default]
    Stable,
    /// `GET /cgi-bin/token`: every call invalidates the previous token (5 minutes of overlap).
    Classic,
}

/// One provider account whose access token this service keeps.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AccountConfig {
    pub kind: AccountKind,
    /// The appid (the corpid for WeCom).
    pub appid: String,
    /// The app secret inline, or:
    pub secret: Option<String>,
    /// a file holding the secret (e.g. a mounted Kubernetes Secret), read at start.
    pub secret_file: Option<PathBuf>,
    /// WeCom application id (informational).
    pub agent_id: Option<String>,
    /// Provider base URL (`https://qyapi.weixin.qq.com` for WeCom).
    pub base_url: String,
    pub token_endpoint: TokenEndpoint,
}

impl Default for AccountConfig {
    fn default() -> Self {
        Self {
            kind: AccountKind::WechatOfficialAccount,
            appid: String::new(),
            secret: None,
            secret_file: None,
            agent_id: None,
            base_url: "https://api.weixin.qq.com".into(),
            token_endpoint: TokenEndpoint::Stable,
        }
    }
}

impl fmt::Debug for AccountConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountConfig")
            .field("kind", &self.kind)
            .field("appid", &self.appid)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .field("agent_id", &self.agent_id)
            .field("base_url", &self.base_url)
            .field("token_endpoint", &self.token_endpoint)
            .finish()
    }
}

/// The app secret once resolved; never printed.
#[derive(Clone)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl AccountConfig {
    /// Resolves the secret: exactly one of `secret` and `secret_file` must be set.
    pub(crate) fn resolve_secret(&self) -> Result<Secret, String> {
        let secret = match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => return Err("set only one of secret and secret_file".into()),
            (None, None) => return Err("one of secret or secret_file is required".into()),
            (Some(secret), None) => secret.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read secret_file {}: {e}", path.display()))?
                .trim()
                .to_string(),
        };
        if secret.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(Secret(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_secret() {
        let mut config = TokenServiceConfig::default();
        config.accounts.insert(
            "demo-oa".into(),
            AccountConfig {
                kind: AccountKind::WechatOfficialAccount,
                appid: "wxdemo0000000001".into(),
                secret: Some("demo-secret".into()),
                secret_file: None,
                agent_id: None,
                base_url: "http://127.0.0.1:8099".into(),
                token_endpoint: TokenEndpoint::Stable,
            },
        );
        let printed = format!("{config:?} {:#?}", config.accounts);
        assert!(!printed.contains("demo-secret"), "{printed}");
        assert!(printed.contains("wxdemo0000000001"));
        assert!(!printed.contains("dev-internal-token"), "{printed}");
        assert!(!format!("{:?}", Secret("s3cr3t".into())).contains("s3cr3t"));
        let mut with_password = TokenServiceConfig::default();
        with_password.redis.url = "redis://:hunter2@redis.internal:6379/0".into();
        let printed = format!("{with_password:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("redis.internal"), "{printed}");
    }

    #[test]
    fn kinds_use_snake_case() {
        let kind: AccountKind = serde_json::from_str("\"wecom_app\"").expect("kind");
        assert_eq!(kind, AccountKind::WecomApp);
        let endpoint: TokenEndpoint = serde_json::from_str("\"classic\"").expect("endpoint");
        assert_eq!(endpoint, TokenEndpoint::Classic);
    }

    #[test]
    fn exactly_one_secret_source() {
        let mut account = AccountConfig {
            appid: "wx1".into(),
            ..AccountConfig::default()
        };
        assert!(account.resolve_secret().is_err());
        account.secret = Some("a".into());
        assert_eq!(account.resolve_secret().map(|s| s.0), Ok("a".to_string()));
        account.secret_file = Some("/nonexistent".into());
        assert!(account.resolve_secret().is_err());
        account.secret = None;
        let err = account.resolve_secret().err().unwrap_or_default();
        assert!(err.contains("/nonexistent"), "{err}");
    }
}

#[cfg(test)]
mod load_tests {
    use super::*;

    #[test]
    fn loads_the_token_section_through_herald_config() {
        let dir = std::env::temp_dir().join(format!("herald-token-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("herald.toml");
        std::fs::write(
            &path,
            r#"
[token]
auth_token = "prod-secret"
refresh_at = 0.75
[token.accounts.prod-oa]
kind = "wechat_official_account"
appid = "wxprod"
secret_file = "/run/secrets/oa"
token_endpoint = "classic"
[token.accounts.wecom-hr]
kind = "wecom_app"
appid = "wwcorp"
secret = "s"
agent_id = "1000002"
base_url = "https://qyapi.weixin.qq.com"
"#,
        )
        .expect("write config");
        let env = [(
            "HERALD_TOKEN__LISTEN".to_string(),
            "0.0.0.0:9000".to_string(),
        )];
        let file: TokenFile =
            herald_config::load_with_env(Some(&path), Some(env.into_iter().collect()))
                .expect("load");
        let token = file.token;
        assert_eq!(token.listen, "0.0.0.0:9000");
        assert_eq!(token.auth_token, "prod-secret");
        assert_eq!(token.refresh_at, 0.75);
        let oa = &token.accounts["prod-oa"];
        assert_eq!(oa.kind, AccountKind::WechatOfficialAccount);
        assert_eq!(oa.token_endpoint, TokenEndpoint::Classic);
        assert_eq!(oa.base_url, "https://api.weixin.qq.com");
        assert_eq!(
            oa.secret_file.as_deref(),
            Some(std::path::Path::new("/run/secrets/oa"))
        );
        let wecom = &token.accounts["wecom-hr"];
        assert_eq!(wecom.kind, AccountKind::WecomApp);
        assert_eq!(wecom.agent_id.as_deref(), Some("1000002"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
