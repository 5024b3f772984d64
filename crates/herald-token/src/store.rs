//! The shared state in Redis: the current token per account, the refresh lock, the force-refresh
//! marker and the config-error marker. Every operation is bounded in time; a failure marks Redis
//! down (logged once per transition) and callers fall back to the in-memory copy.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use crate::tail;

/// Upper bound on one Redis round trip.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failure, Redis is not asked again for this long (requests go straight to memory).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Lifetime of the refresh lock: longer than one bounded fetch.
pub(crate) const LOCK_TTL: Duration = Duration::from_secs(10);
/// WeChat accepts `force_refresh` at most once per 30 s.
pub(crate) const FORCE_INTERVAL: Duration = Duration::from_secs(30);
/// A config error is re-tried at most once per this interval.
pub(crate) const CONFIG_ERROR_RETRY: Duration = Duration::from_secs(60);
/// Lifetime of a day's fetch counter: the day itself and the next, whatever the time zone.
const DAILY_COUNTER_TTL: Duration = Duration::from_secs(2 * 24 * 3600);

/// Deletes the lock only if we still own it.
const RELEASE_LOCK: &str = r#"
if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("DEL", KEYS[1])
else
    return 0
end
"#;

/// The current token of one account, as stored in Redis.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredToken {
    pub(crate) access_token: String,
    pub(crate) expires_at: DateTime<Utc>,
    pub(crate) fetched_at: DateTime<Utc>,
}

impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredToken")
            .field("access_token", &tail(&self.access_token))
            .field("expires_at", &self.expires_at)
            .field("fetched_at", &self.fetched_at)
            .finish()
    }
}

/// A config error another replica (or this one) saw at the provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredConfigError {
    pub(crate) errcode: i64,
    pub(crate) errmsg: String,
}

/// Redis could not be reached (already logged).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unreachable;

/// Key names of one account.
pub(crate) struct Keys {
    pub(crate) token: String,
    pub(crate) lock: String,
    pub(crate) forced: String,
    pub(crate) config_error: String,
    /// `<prefix>token-fetches:<account>:`, followed by the Beijing day `YYYYMMDD`.
    fetches: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, account: &str) -> Self {
        Self {
            token: format!("{prefix}token:{account}"),
            lock: format!("{prefix}token-lock:{account}"),
            forced: format!("{prefix}token-forced:{account}"),
            config_error: format!("{prefix}token-error:{account}"),
            fetches: format!("{prefix}token-fetches:{account}:"),
        }
    }

    /// The key counting the calls to the token endpoint on `day` (`YYYYMMDD`, Beijing).
    pub(crate) fn fetches_on(&self, day: &str) -> String {
        format!("{}{day}", self.fetches)
    }
}

pub(crate) struct Store {
    conn: ConnectionManager,
    release: redis::Script,
    up: AtomicBool,
    skip_until: Mutex<Option<Instant>>,
}

impl Store {
    /// Creates the connection manager without waiting for Redis: the service must start (and
    /// serve from the provider) while Redis is down.
    pub(crate) fn new(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid redis url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("redis connection manager: {e}"))?;
        Ok(Self {
            conn,
            release: redis::Script::new(RELEASE_LOCK),
            up: AtomicBool::new(true),
            skip_until: Mutex::new(None),
        })
    }

    fn mark(&self, up: bool, error: Option<&str>) {
        let was_up = self.up.swap(up, Ordering::Relaxed);
        let mut skip = self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
        *skip = if up {
            None
        } else {
            Some(Instant::now() + RETRY_AFTER)
        };
        drop(skip);
        if was_up && !up {
            tracing::warn!(
                error = error.unwrap_or("unknown"),
                "redis unreachable: serving tokens from memory and fetching without the shared lock"
            );
        } else if !was_up && up {
            tracing::info!("redis reachable again");
        }
    }

    fn skipping(&self) -> bool {
        let skip = self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
        skip.is_some_and(|until| Instant::now() < until)
    }

    /// Runs one Redis operation, bounded in time, tracking reachability.
    async fn run<T, F, Fut>(&self, bypass_breaker: bool, op: F) -> Result<T, Unreachable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !bypass_breaker && self.skipping() {
            return Err(Unreachable);
        }
        match tokio::time::timeout(OP_TIMEOUT, op(self.conn.clone())).await {
            Ok(Ok(value)) => {
                self.mark(true, None);
                Ok(value)
            }
            Ok(Err(err)) => {
                self.mark(false, Some(&err.to_string()));
                Err(Unreachable)
            }
            Err(_) => {
                self.mark(false, Some("timed out"));
                Err(Unreachable)
            }
        }
    }

    pub(crate) async fn ping(&self) -> Result<(), Unreachable> {
        self.run(true, |mut conn| async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await
        })
        .await
        .map(|_| ())
    }

    pub(crate) async fn token(&self, keys: &Keys) -> Result<Option<StoredToken>, Unreachable> {
        let raw: Option<String> = self
            .run(false, |mut conn| async move {
                redis::cmd("GET")
                    .arg(&keys.token)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(raw.and_then(|raw| decode(&keys.token, &raw)))
    }

    /// The current token and whether the refresh lock is held, in one round trip.
    pub(crate) async fn token_and_lock(
        &self,
        keys: &Keys,
    ) -> Result<(Option<StoredToken>, bool), Unreachable> {
        let (raw, locked): (Option<String>, bool) = self
            .run(false, |mut conn| async move {
                redis::pipe()
                    .cmd("GET")
                    .arg(&keys.token)
                    .cmd("EXISTS")
                    .arg(&keys.lock)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok((raw.and_then(|raw| decode(&keys.token, &raw)), locked))
    }

    /// Stores the token with a TTL of its remaining lifetime; `only_if_absent` re-seeds Redis
    /// from memory without overwriting a token another replica wrote. Returns whether it was set.
    pub(crate) async fn put_token(
        &self,
        keys: &Keys,
        token: &StoredToken,
        only_if_absent: bool,
    ) -> Result<bool, Unreachable> {
        let ttl_ms = (token.expires_at - Utc::now()).num_milliseconds();
        if ttl_ms <= 0 {
            return Ok(false);
        }
        let json = serde_json::to_string(token).map_err(|_| Unreachable)?;
        let set: Option<String> = self
            .run(false, |mut conn| async move {
                let mut cmd = redis::cmd("SET");
                cmd.arg(&keys.token).arg(json).arg("PX").arg(ttl_ms);
                if only_if_absent {
                    cmd.arg("NX");
                }
                cmd.query_async(&mut conn).await
            })
            .await?;
        Ok(set.is_some())
    }

    /// `SET lock owner NX PX 10000`: true when we got the lock.
    pub(crate) async fn try_lock(&self, keys: &Keys, owner: &str) -> Result<bool, Unreachable> {
        let set: Option<String> = self
            .run(false, |mut conn| async move {
                redis::cmd("SET")
                    .arg(&keys.lock)
                    .arg(owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_TTL.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    pub(crate) async fn unlock(&self, keys: &Keys, owner: &str) -> Result<(), Unreachable> {
        // Bypass the breaker: a lock left behind would stall the other replicas for 10 s.
        self.run(true, |mut conn| async move {
            self.release
                .key(&keys.lock)
                .arg(owner)
                .invoke_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|_| ())
    }

    /// Whether any replica forced a refresh of this account within the last 30 s.
    pub(crate) async fn forced_recently(&self, keys: &Keys) -> Result<bool, Unreachable> {
        self.run(false, |mut conn| async move {
            redis::cmd("EXISTS")
                .arg(&keys.forced)
                .query_async::<bool>(&mut conn)
                .await
        })
        .await
    }

    pub(crate) async fn mark_forced(&self, keys: &Keys) -> Result<(), Unreachable> {
        self.run(false, |mut conn| async move {
            redis::cmd("SET")
                .arg(&keys.forced)
                .arg(Utc::now().to_rfc3339())
                .arg("PX")
                .arg(FORCE_INTERVAL.as_millis() as u64)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    /// Adds `calls` to the day's count of token-endpoint calls (shared by every replica) and
    /// answers the new total.
    pub(crate) async fn count_fetches(
        &self,
        keys: &Keys,
        day: &str,
        calls: u64,
    ) -> Result<u64, Unreachable> {
        let key = keys.fetches_on(day);
        let (total,): (u64,) = self
            .run(false, |mut conn| async move {
                redis::pipe()
                    .atomic()
                    .cmd("INCRBY")
                    .arg(&key)
                    .arg(calls)
                    .cmd("EXPIRE")
                    .arg(&key)
                    .arg(DAILY_COUNTER_TTL.as_secs())
                    .ignore()
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(total)
    }

    /// The day's count of token-endpoint calls (0 when none yet).
    pub(crate) async fn fetches_on(&self, keys: &Keys, day: &str) -> Result<u64, Unreachable> {
        let key = keys.fetches_on(day);
        let count: Option<u64> = self
            .run(false, |mut conn| async move {
                redis::cmd("GET").arg(&key).query_async(&mut conn).await
            })
            .await?;
        Ok(count.unwrap_or(0))
    }

    pub(crate) async fn config_error(
        &self,
        keys: &Keys,
    ) -> Result<Option<StoredConfigError>, Unreachable> {
        let raw: Option<String> = self
            .run(false, |mut conn| async move {
                redis::cmd("GET")
                    .arg(&keys.config_error)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(raw.and_then(|raw| serde_json::from_str(&raw).ok()))
    }

    pub(crate) async fn put_config_error(
        &self,
        keys: &Keys,
        error: &StoredConfigError,
    ) -> Result<(), Unreachable> {
        let json = serde_json::to_string(error).map_err(|_| Unreachable)?;
        self.run(false, |mut conn| async move {
            redis::cmd("SET")
                .arg(&keys.config_error)
                .arg(json)
                .arg("PX")
                .arg(CONFIG_ERROR_RETRY.as_millis() as u64)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    pub(crate) async fn clear_config_error(&self, keys: &Keys) -> Result<(), Unreachable> {
        self.run(false, |mut conn| async move {
            redis::cmd("DEL")
                .arg(&keys.config_error)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }
}

fn decode(key: &str, raw: &str) -> Option<StoredToken> {
    match serde_json::from_str(raw) {
        Ok(token) => Some(token),
        Err(err) => {
            tracing::warn!(key, error = %err, "ignoring an undecodable token in redis");
            None
        }
    }
}
