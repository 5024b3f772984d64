//! Client of the token service, for the senders.
//!
//! ```no_run
//! # async fn example() -> Result<(), herald_token::client::TokenClientError> {
//! let client = herald_token::client::TokenClient::new(&Default::default());
//! let token = client.token("demo-oa").await?;
//! // ... WeChat answers 40001/40014/42001 for it:
//! let fresh = client.report_rejected("demo-oa", &token.access_token).await?;
//! # let _ = fresh; Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::tail;

/// By default a cached token is used until this long before its expiry.
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(60);

/// An access token as the token service hands it out.
#[derive(Clone, Serialize, Deserialize)]
pub struct AccessToken {
    pub account: String,
    pub access_token: String,
    pub expires_at: DateTime<Utc>,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("account", &self.account)
            .field("access_token", &tail(&self.access_token))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenClientError {
    #[error("the token service does not know account {0:?}")]
    UnknownAccount(String),
    #[error("account {account:?} is misconfigured at the provider: errcode {errcode}: {errmsg}")]
    Misconfigured {
        account: String,
        errcode: i64,
        errmsg: String,
    },
    /// Our bearer token was refused: the deployment's shared secret is wrong.
    #[error("the token service refused our credentials")]
    Unauthorized,
    /// The token service URL in the settings is unusable.
    #[error("invalid token service url: {0}")]
    InvalidSettings(String),
    /// Transport trouble, a 5xx, or an answer we could not read: worth trying later.
    #[error("token service unavailable: {0}")]
    Unavailable(String),
}

impl TokenClientError {
    /// True when retrying cannot help until someone changes the configuration.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, TokenClientError::Unavailable(_))
    }
}

/// Talks to the token service and caches each account's token until shortly before expiry.
/// Cheap to clone (clones share the cache).
#[derive(Clone)]
pub struct TokenClient {
    http: reqwest::Client,
    base: Result<Url, String>,
    auth_token: String,
    margin: Duration,
    cache: Arc<Mutex<HashMap<String, AccessToken>>>,
}

impl fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenClient")
            .field("base", &self.base)
            .field("auth_token", &"<redacted>")
            .field("margin", &self.margin)
            .finish()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    errcode: Option<i64>,
    #[serde(default)]
    errmsg: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl TokenClient {
    pub fn new(settings: &herald_config::TokenServiceClientSettings) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(20))
            .build()
            // Fails only if the TLS backend cannot start; fall back to the default client.
            .unwrap_or_default();
        let base = Url::parse(&settings.url)
            .map_err(|e| format!("{e}"))
            .and_then(|url| {
                if url.cannot_be_a_base() {
                    Err("not a base URL".into())
                } else {
                    Ok(url)
                }
            });
        Self {
            http,
            base,
            auth_token: settings.auth_token.clone(),
            margin: DEFAULT_MARGIN,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Uses cached tokens until `margin` before their expiry (default 60 s).
    pub fn with_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    fn url(&self, account: &str, invalidate: bool) -> Result<Url, TokenClientError> {
        let mut url = self
            .base
            .clone()
            .map_err(TokenClientError::InvalidSettings)?;
        {
            let mut segments = url
                .path_segments_mut()
                .map_err(|()| TokenClientError::InvalidSettings("not a base URL".into()))?;
            segments.pop_if_empty().extend(["v1", "tokens", account]);
            if invalidate {
                segments.push("invalidate");
            }
        }
        Ok(url)
    }

    fn cached(&self, account: &str) -> Option<AccessToken> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let token = cache.get(account)?;
        let left = (token.expires_at - Utc::now()).to_std().ok()?;
        (left > self.margin).then(|| token.clone())
    }

    fn remember(&self, token: &AccessToken) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(token.account.clone(), token.clone());
    }

    /// The account's token: from the local cache while it has more than the margin left, else
    /// from the token service.
    pub async fn token(&self, account: &str) -> Result<AccessToken, TokenClientError> {
        if let Some(token) = self.cached(account) {
            return Ok(token);
        }
        let request = self.http.get(self.url(account, false)?);
        let token = self.send(account, request).await?;
        self.remember(&token);
        Ok(token)
    }

    /// Reports that the provider rejected `rejected` (40001/40014/42001). The token service
    /// refreshes only if it is still the current token; the answer is the current token either
    /// way, and replaces the local cache.
    pub async fn report_rejected(
        &self,
        account: &str,
        rejected: &str,
    ) -> Result<AccessToken, TokenClientError> {
        let request = self
            .http
            .post(self.url(account, true)?)
            .json(&json!({"access_token": rejected}));
        let token = self.send(account, request).await?;
        self.remember(&token);
        Ok(token)
    }

    async fn send(
        &self,
        account: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<AccessToken, TokenClientError> {
        let response = request
            .bearer_auth(&self.auth_token)
            .send()
            .await
            .map_err(|e| TokenClientError::Unavailable(e.without_url().to_string()))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| TokenClientError::Unavailable(e.without_url().to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| TokenClientError::Unavailable(format!("unreadable answer: {e}")));
        }
        let error: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        match (status, error) {
            (StatusCode::UNAUTHORIZED, _) => Err(TokenClientError::Unauthorized),
            (StatusCode::NOT_FOUND, Some(e)) if e.error == "unknown_account" => {
                Err(TokenClientError::UnknownAccount(account.to_string()))
            }
            (_, Some(e)) if e.error == "account_misconfigured" => {
                Err(TokenClientError::Misconfigured {
                    account: account.to_string(),
                    errcode: e.errcode.unwrap_or_default(),
                    errmsg: e.errmsg.unwrap_or_default(),
                })
            }
            (_, Some(e)) if !e.error.is_empty() => Err(TokenClientError::Unavailable(format!(
                "{status}: {}{}",
                e.error,
                e.message.map(|m| format!(": {m}")).unwrap_or_default()
            ))),
            _ => Err(TokenClientError::Unavailable(format!("status {status}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(url: &str) -> TokenClient {
        TokenClient::new(&herald_config::TokenServiceClientSettings {
            url: url.into(),
            auth_token: "secret-bearer".into(),
        })
    }

    #[test]
    fn urls_escape_the_account() {
        let c = client("http://127.0.0.1:8091/");
        assert_eq!(
            c.url("demo-oa", false).map(|u| u.to_string()).ok(),
            Some("http://127.0.0.1:8091/v1/tokens/demo-oa".to_string())
        );
        assert_eq!(
            c.url("a/b", true).map(|u| u.to_string()).ok(),
            Some("http://127.0.0.1:8091/v1/tokens/a%2Fb/invalidate".to_string())
        );
        let prefixed = client("http://h/token-service");
        assert_eq!(
            prefixed.url("x", false).map(|u| u.to_string()).ok(),
            Some("http://h/token-service/v1/tokens/x".to_string())
        );
        assert!(matches!(
            client("not a url").url("x", false),
            Err(TokenClientError::InvalidSettings(_))
        ));
    }

    #[test]
    fn debug_hides_secrets() {
        let token = AccessToken {
            account: "a".into(),
            access_token: "0123456789abcdefghijXYZ123".into(),
            expires_at: Utc::now(),
        };
        let printed = format!("{token:?}");
        assert!(!printed.contains("0123456789"), "{printed}");
        assert!(printed.contains("XYZ123"), "{printed}");
        assert!(!format!("{:?}", client("http://h/")).contains("secret-bearer"));
    }

    #[test]
    fn permanence() {
        assert!(TokenClientError::UnknownAccount("a".into()).is_permanent());
        assert!(TokenClientError::Unauthorized.is_permanent());
        assert!(!TokenClientError::Unavailable("x".into()).is_permanent());
    }
}
