//! Rate limits shared by every sender replica: GCRA with the theoretical arrival time (TAT) of
//! each provider account kept in Redis, advanced by one Lua script per send (one round trip,
//! Redis' own clock, so replicas with skewed clocks agree). The script reserves: it returns how
//! long the caller must wait for its slot and moves the TAT on, unless that wait is above the
//! bound, in which case nothing is reserved and the job is rescheduled through a delay tier.
//!
//! If Redis cannot be reached, a local `governor` limiter per account takes over with the limit
//! divided by the configured replica count, so the replicas together still stay under it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use herald_config::RedisSettings;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::channel::NarrowerLimit;
use crate::meters;

/// A limit: `per_second` sends, with bursts of up to `burst` at once (1: evenly spaced, so no
/// 1-second window holds more than `per_second`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    pub per_second: f64,
    #[serde(default = "one")]
    pub burst: u32,
}

fn one() -> u32 {
    1
}

/// `[sender.accounts."<account>"]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AccountSettings {
    pub rate_limit: Option<RateLimit>,
    /// What the account is at the provider, where the API differs by kind.
    pub kind: AccountKind,
    /// WeCom: the application's `agentid` (its token comes from the token service).
    pub agent_id: Option<u32>,
    /// WeCom: what one member may receive from the application. WeCom drops, silently,
    /// whatever passes 30 a minute per member; the default (25 a minute, bursts of 5) keeps
    /// every 60-second window at 30 or fewer.
    pub member_rate_limit: Option<RateLimit>,
}

/// A WeChat account's kind: subscribe messages go through the Official Account's `bizsend` or
/// the mini program's `subscribe/send`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    #[default]
    OfficialAccount,
    MiniProgram,
}

/// What a job gets from the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Send at this instant (now or soon: the wait is within the bound).
    At(Instant),
    /// The wait would be this long, above the bound: nothing reserved, reschedule the job.
    Later(Duration),
}

/// One TAT per account; see the module docs.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
if wait > max_wait then return {0, wait} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, wait}
";

/// Local limiters kept at most (see `local_limiter`).
const LOCAL_LIMITERS_MAX: usize = 10_000;

/// After a Redis failure, the local limiter decides alone this long before Redis is tried again.
const REDIS_BACKOFF: Duration = Duration::from_secs(1);

pub struct RateLimiter {
    redis: Option<ConnectionManager>,
    script: redis::Script,
    key_prefix: String,
    replicas: u32,
    max_wait: Duration,
    /// Added to each second when spacing sends (see `SenderSettings::rate_limit_margin_ms`).
    margin: Duration,
    redis_down_until: Mutex<Option<Instant>>,
    local: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("key_prefix", &self.key_prefix)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// Connects lazily: a Redis that is down at start only means the local limiter decides.
    pub fn new(redis: &RedisSettings, replicas: u32, max_wait: Duration, margin: Duration) -> Self {
        let manager = redis::Client::open(redis.url.as_str())
            .and_then(|client| {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_millis(250)))
                    .set_response_timeout(Some(Duration::from_millis(250)))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(100));
                ConnectionManager::new_lazy_with_config(client, config)
            })
            .map_err(
                |error| tracing::warn!(%error, "sender.redis unusable; rate limits are local only"),
            )
            .ok();
        Self {
            redis: manager,
            script: redis::Script::new(GCRA),
            key_prefix: redis.key_prefix.clone(),
            replicas: replicas.max(1),
            max_wait,
            margin,
            redis_down_until: Mutex::new(None),
            local: Mutex::new(HashMap::new()),
        }
    }

    /// Slots further away than this are not reserved.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// The Redis key holding `account`'s TAT.
    pub fn key(&self, account: &str) -> String {
        format!("{}sender:rate:{account}", self.key_prefix)
    }

    /// Time between two sends at `limit`, margin included.
    fn interval(&self, limit: RateLimit) -> Duration {
        let per_second = if limit.per_second.is_finite() && limit.per_second > 0.0 {
            limit.per_second
        } else {
            f64::MIN_POSITIVE
        };
        Duration::from_secs_f64(((1.0 + self.margin.as_secs_f64()) / per_second).min(86_400.0))
    }

    /// Takes a slot for one send from `account`.
    pub async fn reserve(&self, account: &str, limit: RateLimit) -> Slot {
        self.reserve_for(account, account, limit).await
    }

    /// Takes a slot under a limit within `account` (one WeCom member, one e-mail domain).
    pub async fn reserve_narrower(&self, account: &str, narrower: &NarrowerLimit) -> Slot {
        let id = format!("{account}/{}/{}", narrower.scope, narrower.id);
        self.reserve_for(&id, account, narrower.limit).await
    }

    /// A slot under the limit kept as `id`; metrics name the `account` it belongs to.
    async fn reserve_for(&self, id: &str, account: &str, limit: RateLimit) -> Slot {
        if let Some(redis) = self.redis.clone()
            && !self.redis_backing_off()
        {
            match self.reserve_shared(redis, id, limit).await {
                Ok(slot) => return slot,
                Err(error) => {
                    tracing::warn!(%error, account, "rate limiter: Redis unreachable; the local limiter decides for a while");
                    if let Ok(mut until) = self.redis_down_until.lock() {
                        *until = Some(Instant::now() + REDIS_BACKOFF);
                    }
                }
            }
        }
        meters::limiter_fallback(account);
        self.reserve_local(id, limit).await
    }

    fn redis_backing_off(&self) -> bool {
        match self.redis_down_until.lock() {
            Ok(until) => until.is_some_and(|t| Instant::now() < t),
            Err(_) => false,
        }
    }

    async fn reserve_shared(
        &self,
        mut redis: ConnectionManager,
        account: &str,
        limit: RateLimit,
    ) -> redis::RedisResult<Slot> {
        let interval = self.interval(limit);
        let tolerance = interval * limit.burst.max(1).saturating_sub(1);
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let asked = Instant::now();
        let (reserved, wait): (i64, i64) = self
            .script
            .key(self.key(account))
            .arg(micros(interval))
            .arg(micros(tolerance))
            .arg(micros(self.max_wait))
            .invoke_async(&mut redis)
            .await?;
        let wait = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
        Ok(if reserved == 1 {
            Slot::At(asked + wait)
        } else {
            Slot::Later(wait)
        })
    }

    /// The local fallback: `limit / replicas` for this process.
    async fn reserve_local(&self, account: &str, limit: RateLimit) -> Slot {
        let limiter = self.local_limiter(account, limit);
        let clock = DefaultClock::default();
        let start = Instant::now();
        loop {
            match limiter.check() {
                Ok(()) => return Slot::At(Instant::now()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(clock.now());
                    if start.elapsed() + wait > self.max_wait {
                        return Slot::Later(wait);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn local_limiter(&self, account: &str, limit: RateLimit) -> Arc<DefaultDirectRateLimiter> {
        let mut local = match self.local.lock() {
            Ok(local) => local,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Narrower limits (one per member, domain, endpoint) are many: past a bound their
        // local state is dropped, which can only matter while Redis is unreachable.
        if local.len() >= LOCAL_LIMITERS_MAX {
            local.retain(|id, _| !id.contains('/'));
        }
        local
            .entry(account.to_string())
            .or_insert_with(|| {
                let period = self.interval(limit) * self.replicas;
                let burst = NonZeroU32::new(limit.burst.div_ceil(self.replicas).max(1))
                    .unwrap_or(NonZeroU32::MIN);
                let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
                    .unwrap_or_else(|| Quota::per_hour(NonZeroU32::MIN))
                    .allow_burst(burst);
                Arc::new(DefaultDirectRateLimiter::direct(quota))
            })
            .clone()
    }
}
