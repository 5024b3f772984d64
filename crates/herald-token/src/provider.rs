//! Calls to the providers' token endpoints (WeChat `/cgi-bin/stable_token` and `/cgi-bin/token`,
//! WeCom `/cgi-bin/gettoken`), with the retry policy for transient failures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Deserialize;
use serde_json::json;

use crate::config::{AccountKind, Secret, TokenEndpoint};
use crate::meters::{self, Outcome};

/// Tries of one fetch in all (the first and three retries).
const FETCH_TRIES: usize = 4;
const RETRY_MIN_DELAY: Duration = Duration::from_millis(200);
const RETRY_MAX_DELAY: Duration = Duration::from_secs(2);

/// What a provider call needs to know about one account.
pub(crate) struct Endpoint {
    pub(crate) account: String,
    pub(crate) kind: AccountKind,
    pub(crate) appid: String,
    pub(crate) secret: Secret,
    pub(crate) base_url: String,
    pub(crate) token_endpoint: TokenEndpoint,
}

/// How to ask for the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchMode {
    /// The provider's current token (for stable_token: the same one until ~5 minutes before expiry).
    Normal,
    /// stable_token with `force_refresh: true`: invalidate the current token and issue a new one.
    Force,
}

/// A token as the provider issued it.
#[derive(Clone)]
pub(crate) struct Issued {
    pub(crate) access_token: String,
    pub(crate) expires_in: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ProviderError {
    /// The provider rejected the account's credentials or origin: retrying will not help.
    #[error("errcode {errcode}: {errmsg}")]
    Config { errcode: i64, errmsg: String },
    /// Any other provider error code.
    #[error("errcode {errcode}: {errmsg}")]
    Api { errcode: i64, errmsg: String },
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("transport: {0}")]
    Transport(String),
    #[error("unexpected answer: {0}")]
    Malformed(String),
}

impl ProviderError {
    /// Worth another try after a short backoff: system busy, 5xx, transport trouble.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            ProviderError::Api { errcode, .. } => *errcode == -1,
            ProviderError::Status(status) => *status >= 500 || *status == 429,
            ProviderError::Transport(_) | ProviderError::Malformed(_) => true,
            ProviderError::Config { .. } => false,
        }
    }

    pub(crate) fn errcode(&self) -> Option<i64> {
        match self {
            ProviderError::Config { errcode, .. } | ProviderError::Api { errcode, .. } => {
                Some(*errcode)
            }
            _ => None,
        }
    }
}

/// Error codes that mean the account itself is misconfigured, at the token endpoint.
pub(crate) fn is_config_error(kind: AccountKind, errcode: i64) -> bool {
    match kind {
        // 40013 invalid appid, 40125 invalid appsecret, 40001 wrong secret (at the token endpoint),
        // 40002 invalid grant_type, 40164 caller IP not in the whitelist.
        AccountKind::WechatOfficialAccount | AccountKind::WechatMiniProgram => {
            matches!(errcode, 40001 | 40002 | 40013 | 40125 | 40164)
        }
        // 40001 invalid secret, 40013 invalid corpid, 40091 invalid secret format.
        AccountKind::WecomApp => matches!(errcode, 40001 | 40013 | 40091),
    }
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    errcode: i64,
    #[serde(default)]
    errmsg: String,
    access_token: Option<String>,
    expires_in: Option<i64>,
}

/// The transport error as text, without the request URL (which carries the secret for GETs).
fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = if err.is_timeout() {
        "timed out".to_string()
    } else if err.is_connect() {
        "connect failed".to_string()
    } else {
        err.to_string()
    };
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn url(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// One call to the account's token endpoint.
pub(crate) async fn request_once(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    mode: FetchMode,
) -> Result<Issued, ProviderError> {
    let secret = endpoint.secret.expose();
    let request = match (endpoint.kind, endpoint.token_endpoint) {
        (AccountKind::WecomApp, _) => http
            .get(url(&endpoint.base_url, "/cgi-bin/gettoken"))
            .query(&[("corpid", endpoint.appid.as_str()), ("corpsecret", secret)]),
        (_, TokenEndpoint::Classic) => {
            http.get(url(&endpoint.base_url, "/cgi-bin/token")).query(&[
                ("grant_type", "client_credential"),
                ("appid", endpoint.appid.as_str()),
                ("secret", secret),
            ])
        }
        (_, TokenEndpoint::Stable) => http
            .post(url(&endpoint.base_url, "/cgi-bin/stable_token"))
            .json(&json!({
                "grant_type": "client_credential",
                "appid": endpoint.appid,
                "secret": secret,
                "force_refresh": mode == FetchMode::Force,
            })),
    };
    let response = request
        .send()
        .await
        .map_err(|e| ProviderError::Transport(describe(e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(ProviderError::Status(status.as_u16()));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| ProviderError::Transport(describe(e)))?;
    let answer: Answer =
        serde_json::from_slice(&body).map_err(|e| ProviderError::Malformed(e.to_string()))?;
    if answer.errcode != 0 {
        return Err(if is_config_error(endpoint.kind, answer.errcode) {
            ProviderError::Config {
                errcode: answer.errcode,
                errmsg: answer.errmsg,
            }
        } else {
            ProviderError::Api {
                errcode: answer.errcode,
                errmsg: answer.errmsg,
            }
        });
    }
    match (answer.access_token, answer.expires_in) {
        (Some(access_token), Some(expires_in)) if !access_token.is_empty() && expires_in > 0 => {
            Ok(Issued {
                access_token,
                expires_in,
            })
        }
        _ => Err(ProviderError::Malformed(
            "no access_token or expires_in in a success answer".into(),
        )),
    }
}

/// Calls to a token endpoint made by one [`fetch`]: each one counts against the daily quota.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    started: AtomicU64,
    finished: AtomicU64,
}

impl Calls {
    pub(crate) fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// The fetch was abandoned (its time budget ran out): a call still in flight counts as a
    /// transient error.
    pub(crate) fn abandon(&self, account: &str) {
        let unfinished = self
            .started()
            .saturating_sub(self.finished.load(Ordering::Relaxed));
        for _ in 0..unfinished {
            meters::fetched(account, Outcome::TransientError);
        }
    }
}

fn outcome(result: &Result<Issued, ProviderError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(ProviderError::Config { .. }) => Outcome::ConfigError,
        Err(_) => Outcome::TransientError,
    }
}

/// Fetches with bounded retries for transient failures. Only the first try of a forced
/// stable_token refresh forces: a retry asks normally, because the forced call may have gone
/// through (WeChat refuses a second force within 30 s), and a normal stable_token call returns
/// whichever token is current.
pub(crate) async fn fetch(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    mode: FetchMode,
    calls: &Calls,
) -> Result<Issued, ProviderError> {
    let call = || async {
        let n = calls.started.fetch_add(1, Ordering::Relaxed);
        let mode = if n == 0 { mode } else { FetchMode::Normal };
        let result = request_once(http, endpoint, mode).await;
        calls.finished.fetch_add(1, Ordering::Relaxed);
        meters::fetched(&endpoint.account, outcome(&result));
        result
    };
    call.retry(
        ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN_DELAY)
            .with_max_delay(RETRY_MAX_DELAY)
            .with_max_times(FETCH_TRIES - 1)
            .with_jitter(),
    )
    .sleep(tokio::time::sleep)
    .when(ProviderError::is_transient)
    .notify(|err, delay| {
        tracing::warn!(
            account = %endpoint.account,
            error = %err,
            retry_in_ms = delay.as_millis() as u64,
            "token endpoint failed, retrying"
        );
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let wechat = AccountKind::WechatOfficialAccount;
        for code in [40001, 40002, 40013, 40125, 40164] {
            assert!(is_config_error(wechat, code), "{code}");
        }
        assert!(!is_config_error(wechat, -1));
        assert!(!is_config_error(wechat, 45009));
        assert!(!is_config_error(AccountKind::WecomApp, 40125));
        assert!(is_config_error(AccountKind::WecomApp, 40091));

        let busy = ProviderError::Api {
            errcode: -1,
            errmsg: "system busy".into(),
        };
        assert!(busy.is_transient());
        assert!(ProviderError::Status(502).is_transient());
        assert!(!ProviderError::Status(404).is_transient());
        assert!(
            !ProviderError::Config {
                errcode: 40125,
                errmsg: String::new()
            }
            .is_transient()
        );
        assert!(
            !ProviderError::Api {
                errcode: 45009,
                errmsg: String::new()
            }
            .is_transient()
        );
    }

    #[test]
    fn url_joins_without_double_slash() {
        assert_eq!(
            url("http://h:1/", "/cgi-bin/token"),
            "http://h:1/cgi-bin/token"
        );
        assert_eq!(
            url("http://h:1", "/cgi-bin/token"),
            "http://h:1/cgi-bin/token"
        );
    }
}
