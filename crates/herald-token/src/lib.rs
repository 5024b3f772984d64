//! Herald's token service: the only component that calls the providers' token endpoints.
//!
//! Every replica shares one Redis. The current token of each account lives under
//! `<prefix>token:<account>`; a refresh is single-flight across replicas (a `SET NX PX` lock,
//! released by a compare-and-delete script) and within a process (a per-account mutex), so a
//! storm of callers reporting the same rejected token causes one provider call. When Redis is
//! unreachable the service keeps serving from an in-memory copy and fetches on its own.
//!
//! [`client::TokenClient`] is the library senders use to talk to the service. Metrics go through
//! the `metrics` facade (see `meters.rs`); `docs/tokens.md` describes the whole model.

pub mod client;
mod config;
mod http;
mod meters;
mod provider;
mod store;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use config::{AccountConfig, AccountKind, TokenEndpoint, TokenFile, TokenServiceConfig};

use meters::Cause;
use provider::{Endpoint, FetchMode, ProviderError};
use store::{
    CONFIG_ERROR_RETRY, FORCE_INTERVAL, Keys, LOCK_TTL, Store, StoredConfigError, StoredToken,
};

/// A token with less than this left is not handed out: it is fetched anew. (Tokens living
/// less than ten times this, which only test providers issue, get a tenth of their lifetime.)
const USABLE_MARGIN: Duration = Duration::from_secs(30);
/// Upper bound on one provider fetch, retries included: shorter than the lock's lifetime.
const FETCH_BUDGET: Duration = Duration::from_secs(9);
/// How long a request waits for another replica's refresh before giving up.
const WAIT_FOR_OTHER_REPLICA: Duration = Duration::from_secs(12);
/// How often at most the background task looks for tokens due for refresh; it wakes earlier
/// when a token it knows is due sooner.
const REFRESH_TICK: Duration = Duration::from_secs(15);
/// The background task never wakes more often than this.
const MIN_REFRESH_WAIT: Duration = Duration::from_millis(100);
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the token service.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The service configuration is unusable (at start).
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    /// The provider rejected the account's credentials or our IP: fix the configuration.
    #[error("account {account:?} is misconfigured at the provider: errcode {errcode}: {errmsg}")]
    Misconfigured {
        account: String,
        errcode: i64,
        errmsg: String,
    },
    /// The provider could not be reached or answered with an error worth trying later.
    #[error("provider unavailable for account {account:?}: {message}")]
    ProviderUnavailable {
        account: String,
        errcode: Option<i64>,
        message: String,
    },
}

/// The current token of an account, as the HTTP API returns it.
#[derive(Clone, Serialize)]
pub struct CurrentToken {
    pub account: String,
    pub access_token: String,
    pub expires_at: DateTime<Utc>,
    pub fetched_at: DateTime<Utc>,
}

impl std::fmt::Debug for CurrentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentToken")
            .field("account", &self.account)
            .field("access_token", &tail(&self.access_token))
            .field("expires_at", &self.expires_at)
            .field("fetched_at", &self.fetched_at)
            .finish()
    }
}

/// What `/readyz` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub redis: &'static str,
    pub misconfigured_accounts: Vec<MisconfiguredAccount>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MisconfiguredAccount {
    pub account: String,
    pub errcode: i64,
    pub errmsg: String,
}

/// A token as it may be logged: its last 6 characters only.
pub(crate) fn tail(token: &str) -> String {
    let count = token.chars().count();
    if count <= 12 {
        return "***".into();
    }
    let last: String = token.chars().skip(count - 6).collect();
    format!("…{last}")
}

/// The token service. Cheap to clone.
#[derive(Clone)]
pub struct TokenService {
    inner: Arc<Inner>,
}

struct Inner {
    accounts: BTreeMap<String, Account>,
    store: Store,
    http: reqwest::Client,
    auth_token: String,
    refresh_at: f64,
}

struct Account {
    endpoint: Endpoint,
    keys: Keys,
    /// The provider's daily quota of token calls, when known.
    daily_limit: Option<u64>,
    /// Single flight within the process.
    flight: tokio::sync::Mutex<()>,
    state: Mutex<AccountState>,
}

#[derive(Default)]
struct AccountState {
    /// Copy of the current token, used while Redis is unreachable.
    memory: Option<StoredToken>,
    last_force: Option<Instant>,
    misconfigured: Option<Misconfig>,
    /// The last failed fetch, shared with the requests that were waiting for it.
    last_failure: Option<(Instant, TokenError)>,
    /// Token-endpoint calls on a Beijing day (`YYYYMMDD`): the shared count from Redis when it
    /// answers, else this replica's own.
    daily_calls: Option<(String, u64)>,
}

#[derive(Clone)]
struct Misconfig {
    errcode: i64,
    errmsg: String,
    marked: Instant,
    marked_at: DateTime<Utc>,
}

impl Account {
    fn name(&self) -> &str {
        &self.endpoint.account
    }

    fn state(&self) -> MutexGuard<'_, AccountState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn misconfigured_error(&self, m: &Misconfig) -> TokenError {
        TokenError::Misconfigured {
            account: self.name().to_string(),
            errcode: m.errcode,
            errmsg: m.errmsg.clone(),
        }
    }

    fn current_token(&self, token: StoredToken) -> CurrentToken {
        CurrentToken {
            account: self.name().to_string(),
            access_token: token.access_token,
            expires_at: token.expires_at,
            fetched_at: token.fetched_at,
        }
    }

    fn is_wechat_stable(&self) -> bool {
        self.endpoint.kind != AccountKind::WecomApp
            && self.endpoint.token_endpoint == TokenEndpoint::Stable
    }
}

/// What a caller needs from the current token.
enum Want {
    /// Any token with some life left.
    Usable,
    /// A token not yet past `refresh_at` of its lifetime (the background refresher).
    Fresh,
    /// Anything but the rejected token, unless that one was fetched again after the report.
    Replace {
        rejected: String,
        since: DateTime<Utc>,
    },
}

fn usable(token: &StoredToken, now: DateTime<Utc>) -> bool {
    let lifetime = (token.expires_at - token.fetched_at)
        .to_std()
        .unwrap_or_default();
    let margin = USABLE_MARGIN.min(lifetime / 10);
    (token.expires_at - now)
        .to_std()
        .is_ok_and(|left| left > margin)
}

impl TokenService {
    /// Validates the configuration, reads secret files, and sets up Redis and the HTTP client.
    /// Redis is connected lazily: the service starts (and serves from the provider) while Redis
    /// is down.
    pub async fn new(config: TokenServiceConfig) -> Result<Self, TokenError> {
        if !(config.refresh_at > 0.0 && config.refresh_at < 1.0) {
            return Err(TokenError::Config(format!(
                "refresh_at must be between 0 and 1, not {}",
                config.refresh_at
            )));
        }
        if config.auth_token.is_empty() {
            return Err(TokenError::Config("auth_token must not be empty".into()));
        }
        let mut accounts = BTreeMap::new();
        for (name, account) in &config.accounts {
            let invalid =
                |message: String| TokenError::Config(format!("account {name:?}: {message}"));
            if account.appid.is_empty() {
                return Err(invalid("appid is required".into()));
            }
            if reqwest::Url::parse(&account.base_url).is_err() {
                return Err(invalid(format!("invalid base_url {:?}", account.base_url)));
            }
            let secret = account.resolve_secret().map_err(invalid)?;
            accounts.insert(
                name.clone(),
                Account {
                    endpoint: Endpoint {
                        account: name.clone(),
                        kind: account.kind,
                        appid: account.appid.clone(),
                        secret,
                        base_url: account.base_url.clone(),
                        token_endpoint: account.token_endpoint,
                    },
                    keys: Keys::new(&config.redis.key_prefix, name),
                    daily_limit: meters::daily_limit(account.kind, account.token_endpoint),
                    flight: tokio::sync::Mutex::new(()),
                    state: Mutex::new(AccountState::default()),
                },
            );
        }
        meters::describe();
        for (name, account) in &accounts {
            meters::set_daily_limit(name, account.daily_limit);
            meters::misconfigured(name, false);
        }
        let store = Store::new(&config.redis.url).map_err(TokenError::Config)?;
        let http = reqwest::Client::builder()
            .connect_timeout(HTTP_CONNECT_TIMEOUT)
            .timeout(HTTP_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(8)
            .user_agent(concat!("herald-token/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TokenError::Config(format!("http client: {e}")))?;
        let service = Self {
            inner: Arc::new(Inner {
                accounts,
                store,
                http,
                auth_token: config.auth_token,
                refresh_at: config.refresh_at,
            }),
        };
        // Logs once if Redis is down at start; the service works without it.
        let _ = service.inner.store.ping().await;
        tracing::info!(
            accounts = service.inner.accounts.len(),
            redis = %config::redact_url(&config.redis.url),
            "token service configured"
        );
        Ok(service)
    }

    pub(crate) fn auth_token(&self) -> &str {
        &self.inner.auth_token
    }

    fn account(&self, name: &str) -> Result<&Account, TokenError> {
        self.inner
            .accounts
            .get(name)
            .ok_or_else(|| TokenError::UnknownAccount(name.to_string()))
    }

    /// The current token of `account`, fetched if there is none with some life left.
    pub async fn token(&self, account: &str) -> Result<CurrentToken, TokenError> {
        let acct = self.account(account)?;
        self.resolve(acct, Want::Usable).await
    }

    /// Compare-and-set refresh: a new token is fetched only if `rejected` is still the current
    /// one. Answers the current (possibly new) token either way.
    pub async fn invalidate(
        &self,
        account: &str,
        rejected: &str,
    ) -> Result<CurrentToken, TokenError> {
        let acct = self.account(account)?;
        let want = Want::Replace {
            rejected: rejected.to_string(),
            since: Utc::now(),
        };
        self.resolve(acct, want).await
    }

    /// One pass of the proactive refresher: every account whose token is missing or past
    /// `refresh_at` of its lifetime is refreshed (through the same locked path as requests).
    pub async fn refresh_due(&self) {
        let passes = self.inner.accounts.values().map(|acct| async move {
            match self.resolve(acct, Want::Fresh).await {
                Ok(_) => {}
                Err(TokenError::Misconfigured { errcode, .. }) => {
                    tracing::debug!(
                        account = acct.name(),
                        errcode,
                        "refresh skipped: misconfigured"
                    );
                }
                Err(err) => {
                    tracing::warn!(account = acct.name(), error = %err, "proactive refresh failed");
                }
            }
            self.sync_daily_calls(acct).await;
        });
        futures::future::join_all(passes).await;
    }

    /// How long the background task may sleep: until the earliest known token is due, at most
    /// [`REFRESH_TICK`]. A token already past due (its refresh failed) waits for the tick.
    fn next_wake(&self, now: DateTime<Utc>) -> Duration {
        self.inner
            .accounts
            .values()
            .filter_map(|acct| {
                let memory = acct.state().memory.clone()?;
                (self.due_at(&memory) - now).to_std().ok()
            })
            .filter(|wait| !wait.is_zero())
            .min()
            .map_or(REFRESH_TICK, |wait| {
                wait.clamp(MIN_REFRESH_WAIT, REFRESH_TICK)
            })
    }

    /// When the background task renews `token`: at `refresh_at` of its lifetime.
    fn due_at(&self, token: &StoredToken) -> DateTime<Utc> {
        let lifetime = (token.expires_at - token.fetched_at).num_milliseconds() as f64;
        token.fetched_at + chrono::Duration::milliseconds((lifetime * self.inner.refresh_at) as i64)
    }

    /// Adds `calls` to today's count of token-endpoint calls and updates the gauge.
    async fn count_daily_calls(&self, acct: &Account, calls: u64) {
        if calls == 0 {
            return;
        }
        let day = meters::beijing_day(Utc::now());
        let shared = self
            .inner
            .store
            .count_fetches(&acct.keys, &day, calls)
            .await;
        let total = {
            let mut state = acct.state();
            let total = match (shared, state.daily_calls.take()) {
                (Ok(total), _) => total,
                (Err(_), Some((seen, count))) if seen == day => count + calls,
                (Err(_), _) => calls,
            };
            state.daily_calls = Some((day, total));
            total
        };
        meters::daily_fetches(acct.name(), total);
    }

    /// Re-reads today's shared count (other replicas' calls, the day's rollover) for the gauge.
    async fn sync_daily_calls(&self, acct: &Account) {
        let day = meters::beijing_day(Utc::now());
        let shared = self.inner.store.fetches_on(&acct.keys, &day).await;
        let total = {
            let mut state = acct.state();
            let total = match (shared, state.daily_calls.take()) {
                (Ok(total), _) => total,
                (Err(_), Some((seen, count))) if seen == day => count,
                (Err(_), _) => 0,
            };
            state.daily_calls = Some((day, total));
            total
        };
        meters::daily_fetches(acct.name(), total);
    }

    /// Redis reachability and the accounts in a config-error state.
    pub async fn readiness(&self) -> Readiness {
        let redis_ok = self.inner.store.ping().await.is_ok();
        let misconfigured_accounts: Vec<MisconfiguredAccount> = self
            .inner
            .accounts
            .values()
            .filter_map(|acct| {
                acct.state()
                    .misconfigured
                    .as_ref()
                    .map(|m| MisconfiguredAccount {
                        account: acct.name().to_string(),
                        errcode: m.errcode,
                        errmsg: m.errmsg.clone(),
                    })
            })
            .collect();
        Readiness {
            ready: redis_ok && misconfigured_accounts.is_empty(),
            redis: if redis_ok { "ok" } else { "unreachable" },
            misconfigured_accounts,
        }
    }

    /// The router of the HTTP API (without the background refresher).
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// Serves the HTTP API on `listener` and runs the proactive refresher, both until `shutdown`
    /// completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let stop = CancellationToken::new();
        let refresher = tokio::spawn(self.clone().run_refresher(stop.clone()));
        let stopping = stop.clone();
        let result = axum::serve(listener, self.router())
            .with_graceful_shutdown(async move {
                tokio::select! {
                    () = shutdown => {}
                    () = stopping.cancelled() => {}
                }
            })
            .await;
        stop.cancel();
        if let Err(err) = refresher.await {
            tracing::error!(error = %err, "token refresher task failed");
        }
        result
    }

    async fn run_refresher(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.refresh_due() => {}
            }
            let wait = self.next_wake(Utc::now());
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn satisfies(&self, want: &Want, token: &StoredToken, now: DateTime<Utc>) -> bool {
        if !usable(token, now) {
            return false;
        }
        match want {
            Want::Usable => true,
            Want::Fresh => now < self.due_at(token),
            Want::Replace { rejected, since } => {
                token.access_token != *rejected || token.fetched_at >= *since
            }
        }
    }

    /// The current token from Redis, or from memory when Redis is unreachable. The boolean says
    /// whether Redis answered.
    async fn read_current(&self, acct: &Account) -> (Option<StoredToken>, bool) {
        match self.inner.store.token(&acct.keys).await {
            Ok(Some(token)) => {
                let mut state = acct.state();
                if state
                    .misconfigured
                    .as_ref()
                    .is_some_and(|m| token.fetched_at > m.marked_at)
                {
                    // Another replica fetched successfully since: the configuration works again.
                    state.misconfigured = None;
                    meters::misconfigured(acct.name(), false);
                }
                state.memory = Some(token.clone());
                (Some(token), true)
            }
            Ok(None) => {
                // Redis lost the token (restart, or it was down when we fetched): re-seed it from
                // memory, unless another replica writes one first.
                let remembered = acct.state().memory.clone();
                let Some(remembered) = remembered.filter(|t| usable(t, Utc::now())) else {
                    return (None, true);
                };
                match self
                    .inner
                    .store
                    .put_token(&acct.keys, &remembered, true)
                    .await
                {
                    Ok(true) => (Some(remembered), true),
                    Ok(false) => match self.inner.store.token(&acct.keys).await {
                        Ok(token) => (token, true),
                        Err(_) => (Some(remembered), false),
                    },
                    Err(_) => (Some(remembered), false),
                }
            }
            Err(_) => {
                let remembered = acct.state().memory.clone();
                let now = Utc::now();
                (remembered.filter(|t| t.expires_at > now), false)
            }
        }
    }

    async fn resolve(&self, acct: &Account, want: Want) -> Result<CurrentToken, TokenError> {
        let (current, _) = self.read_current(acct).await;
        let token = match current.filter(|t| self.satisfies(&want, t, Utc::now())) {
            Some(token) => token,
            None => self.refresh(acct, want).await?,
        };
        meters::age(acct.name(), token.fetched_at, Utc::now());
        Ok(acct.current_token(token))
    }

    /// The refresh path: single flight within the process, then across replicas.
    async fn refresh(&self, acct: &Account, want: Want) -> Result<StoredToken, TokenError> {
        let started = Instant::now();
        let _flight = acct.flight.lock().await;
        let deadline = started + WAIT_FOR_OTHER_REPLICA;
        loop {
            let (current, redis_ok) = self.read_current(acct).await;
            if let Some(token) = current
                .as_ref()
                .filter(|t| self.satisfies(&want, t, Utc::now()))
            {
                return Ok(token.clone());
            }
            {
                let state = acct.state();
                if let Some((at, err)) = &state.last_failure
                    && *at >= started
                {
                    // The fetch this request waited for failed: share its answer.
                    return Err(err.clone());
                }
                if let Some(m) = &state.misconfigured
                    && m.marked.elapsed() < CONFIG_ERROR_RETRY
                {
                    return Err(acct.misconfigured_error(m));
                }
            }
            if !redis_ok {
                return self.fetch_and_store(acct, &want, current.as_ref()).await;
            }
            let owner = format!("{:032x}", rand::random::<u128>());
            match self.inner.store.try_lock(&acct.keys, &owner).await {
                Ok(true) => {
                    let result = self.refresh_locked(acct, &want).await;
                    if self.inner.store.unlock(&acct.keys, &owner).await.is_err() {
                        tracing::warn!(
                            account = acct.name(),
                            "could not release the refresh lock; it expires by itself"
                        );
                    }
                    return result;
                }
                Ok(false) => {
                    if Instant::now() >= deadline {
                        tracing::warn!(
                            account = acct.name(),
                            "another replica's refresh did not finish in time"
                        );
                        return current.filter(|t| usable(t, Utc::now())).ok_or_else(|| {
                            TokenError::ProviderUnavailable {
                                account: acct.name().to_string(),
                                errcode: None,
                                message: "another replica's refresh did not finish in time".into(),
                            }
                        });
                    }
                    self.wait_for_other_replica(acct, current.as_ref(), deadline)
                        .await;
                }
                Err(_) => return self.fetch_and_store(acct, &want, current.as_ref()).await,
            }
        }
    }

    /// Inside the cross-replica lock: re-check, then fetch.
    async fn refresh_locked(&self, acct: &Account, want: &Want) -> Result<StoredToken, TokenError> {
        let current = match self.inner.store.token(&acct.keys).await {
            Ok(token) => token,
            Err(_) => acct.state().memory.clone(),
        };
        if let Some(token) = current
            .as_ref()
            .filter(|t| self.satisfies(want, t, Utc::now()))
        {
            acct.state().memory = Some(token.clone());
            return Ok(token.clone());
        }
        if let Ok(Some(seen)) = self.inner.store.config_error(&acct.keys).await {
            // Another replica saw a config error less than a minute ago: do not ask again yet.
            let misconfig = Misconfig {
                errcode: seen.errcode,
                errmsg: seen.errmsg,
                marked: Instant::now(),
                marked_at: Utc::now(),
            };
            let err = acct.misconfigured_error(&misconfig);
            acct.state().misconfigured = Some(misconfig);
            meters::misconfigured(acct.name(), true);
            return Err(err);
        }
        self.fetch_and_store(acct, want, current.as_ref()).await
    }

    /// Re-reads Redis with a short backoff until the token changes or the lock disappears.
    async fn wait_for_other_replica(
        &self,
        acct: &Account,
        previous: Option<&StoredToken>,
        deadline: Instant,
    ) {
        use backon::{ExponentialBuilder, Retryable};
        let remaining = deadline.saturating_duration_since(Instant::now());
        let poll = || async {
            match self.inner.store.token_and_lock(&acct.keys).await {
                Ok((token, locked)) if locked && token.as_ref() == previous => Err(()),
                _ => Ok(()),
            }
        };
        let _ = poll
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(20))
                    .with_max_delay(Duration::from_millis(500))
                    .with_max_times(usize::MAX)
                    .with_total_delay(Some(remaining)),
            )
            .sleep(tokio::time::sleep)
            .await;
    }

    /// Decides force or normal, calls the provider, and records the outcome.
    async fn fetch_and_store(
        &self,
        acct: &Account,
        want: &Want,
        current: Option<&StoredToken>,
    ) -> Result<StoredToken, TokenError> {
        let replacing = match want {
            Want::Replace { rejected, .. } => current.is_some_and(|c| c.access_token == *rejected),
            _ => false,
        };
        let cause = match want {
            Want::Replace { .. } if replacing => Cause::Invalidated,
            Want::Fresh if current.is_some_and(|c| usable(c, Utc::now())) => Cause::Proactive,
            _ => Cause::Cold,
        };
        let mode = if replacing && acct.is_wechat_stable() && self.may_force(acct).await {
            acct.state().last_force = Some(Instant::now());
            let _ = self.inner.store.mark_forced(&acct.keys).await;
            FetchMode::Force
        } else {
            FetchMode::Normal
        };
        tracing::debug!(
            account = acct.name(),
            ?mode,
            ?cause,
            "calling the token endpoint"
        );
        let calls = provider::Calls::default();
        let outcome = tokio::time::timeout(
            FETCH_BUDGET,
            provider::fetch(&self.inner.http, &acct.endpoint, mode, &calls),
        )
        .await
        .unwrap_or_else(|_| {
            calls.abandon(acct.name());
            Err(ProviderError::Transport("token fetch took too long".into()))
        });
        let result = match outcome {
            Ok(issued) => {
                let now = Utc::now();
                let token = StoredToken {
                    expires_at: now + chrono::Duration::seconds(issued.expires_in),
                    fetched_at: now,
                    access_token: issued.access_token,
                };
                let had_error = {
                    let mut state = acct.state();
                    state.memory = Some(token.clone());
                    state.last_failure = None;
                    state.misconfigured.take().is_some()
                };
                let _ = self.inner.store.put_token(&acct.keys, &token, false).await;
                meters::refreshed(acct.name(), cause);
                meters::misconfigured(acct.name(), false);
                if had_error {
                    let _ = self.inner.store.clear_config_error(&acct.keys).await;
                    tracing::info!(account = acct.name(), "account works again");
                }
                tracing::info!(
                    account = acct.name(),
                    token = %tail(&token.access_token),
                    expires_at = %token.expires_at,
                    forced = mode == FetchMode::Force,
                    cause = ?cause,
                    "token refreshed"
                );
                Ok(token)
            }
            Err(ProviderError::Config { errcode, errmsg }) => {
                tracing::error!(
                    account = acct.name(),
                    errcode,
                    errmsg = %errmsg,
                    "the provider rejected the account configuration; not retrying for a minute"
                );
                let misconfig = Misconfig {
                    errcode,
                    errmsg: errmsg.clone(),
                    marked: Instant::now(),
                    marked_at: Utc::now(),
                };
                let err = acct.misconfigured_error(&misconfig);
                acct.state().misconfigured = Some(misconfig);
                meters::misconfigured(acct.name(), true);
                let _ = self
                    .inner
                    .store
                    .put_config_error(&acct.keys, &StoredConfigError { errcode, errmsg })
                    .await;
                Err(err)
            }
            Err(other) => {
                tracing::warn!(account = acct.name(), error = %other, "token fetch failed");
                let err = TokenError::ProviderUnavailable {
                    account: acct.name().to_string(),
                    errcode: other.errcode(),
                    message: other.to_string(),
                };
                acct.state().last_failure = Some((Instant::now(), err.clone()));
                Err(err)
            }
        };
        // Counted after the token is stored, so replicas polling for it see it sooner.
        self.count_daily_calls(acct, calls.started()).await;
        result
    }

    /// `force_refresh` at most once per 30 s per account, across replicas when Redis answers.
    async fn may_force(&self, acct: &Account) -> bool {
        let recent_here = acct
            .state()
            .last_force
            .is_some_and(|at| at.elapsed() < FORCE_INTERVAL);
        if recent_here {
            return false;
        }
        !matches!(self.inner.store.forced_recently(&acct.keys).await, Ok(true))
    }
}

// The lock must outlive one bounded fetch, or two replicas could fetch at once.
const _: () = assert!(FETCH_BUDGET.as_millis() < LOCK_TTL.as_millis());

#[cfg(test)]
mod tests {
    use super::*;

    fn token(lifetime_secs: i64) -> StoredToken {
        let fetched_at = Utc::now();
        StoredToken {
            access_token: "t".into(),
            expires_at: fetched_at + chrono::Duration::seconds(lifetime_secs),
            fetched_at,
        }
    }

    #[test]
    fn usable_keeps_a_margin_before_expiry() {
        let real = token(7200);
        let at = |left: i64| real.expires_at - chrono::Duration::seconds(left);
        assert!(usable(&real, at(31)));
        assert!(
            !usable(&real, at(29)),
            "30 s before expiry it is fetched anew"
        );
        // A test provider's 10 s token: a tenth of its lifetime, not 30 s.
        let short = token(10);
        let at = |left_ms: i64| short.expires_at - chrono::Duration::milliseconds(left_ms);
        assert!(usable(&short, at(1_100)));
        assert!(!usable(&short, at(900)));
        assert!(!usable(&short, short.expires_at));
    }

    #[test]
    fn tail_shows_only_the_end() {
        assert_eq!(tail("abcdefghijklmnopqrstuvwxyz"), "…uvwxyz");
        assert_eq!(tail("short"), "***");
        assert_eq!(tail(""), "***");
    }
}
