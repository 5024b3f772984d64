//! Preferences and suppression: opt-outs per channel and category, quiet hours in the
//! recipient's time zone (a deferral, which urgent messages skip), frequency caps and content
//! de-duplication. Caps and de-duplication live in Redis so every renderer replica shares
//! them; both are idempotent per delivery id, so a redelivered request counts nothing twice.

use chrono::{DateTime, TimeZone, Utc};
use herald_config::RedisSettings;
use herald_store::{Preferences, QuietHours};
use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

/// Why a delivery is not sent now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Send,
    Suppress {
        reason: &'static str,
        detail: String,
    },
}

/// A delivery as the preference checks see it.
pub struct Candidate<'a> {
    pub tenant: &'a str,
    pub delivery_id: &'a str,
    /// The directory user id, if the request named one.
    pub user_id: Option<&'a str>,
    pub channel: &'a str,
    pub address: &'a str,
    pub template: &'a str,
    pub category: &'a str,
    /// The rendered payload, for de-duplication.
    pub payload: &'a serde_json::Value,
}

/// Sliding-window cap, idempotent per member (the delivery id): a member already counted is
/// allowed again; a new one is counted only if the window has room. Redis' own clock.
const CAP_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// First writer of a content key wins for the window; the same delivery asking again (a
/// redelivered request) is still the first.
const DEDUP_SCRIPT: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
";

/// The Redis side of the checks, connected on first use (a tenant without caps or
/// de-duplication never needs Redis).
pub struct Limits {
    settings: RedisSettings,
    connection: OnceCell<ConnectionManager>,
    cap: redis::Script,
    dedup: redis::Script,
}

fn digest(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0x1f]);
    }
    hex::encode(&hasher.finalize()[..16])
}

impl Limits {
    pub fn new(settings: RedisSettings) -> Self {
        Self {
            settings,
            connection: OnceCell::new(),
            cap: redis::Script::new(CAP_SCRIPT),
            dedup: redis::Script::new(DEDUP_SCRIPT),
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        self.connection
            .get_or_try_init(|| async {
                let client = redis::Client::open(self.settings.url.as_str())?;
                ConnectionManager::new(client).await
            })
            .await
            .cloned()
    }

    /// Opt-outs, then de-duplication, then frequency caps. Quiet hours are a deferral, decided
    /// by [`quiet_until`].
    pub async fn check(
        &self,
        preferences: &Preferences,
        candidate: &Candidate<'_>,
    ) -> Result<Verdict, redis::RedisError> {
        if preferences
            .opt_out_channels
            .iter()
            .flatten()
            .any(|c| c == candidate.channel)
        {
            return Ok(Verdict::Suppress {
                reason: "opted_out",
                detail: format!("the recipient opted out of `{}`", candidate.channel),
            });
        }
        if !candidate.category.is_empty()
            && preferences
                .opt_out_categories
                .iter()
                .flatten()
                .any(|c| c == candidate.category)
        {
            return Ok(Verdict::Suppress {
                reason: "opted_out",
                detail: format!(
                    "the recipient opted out of category `{}`",
                    candidate.category
                ),
            });
        }
        // Keys name the recipient by user id, or by a digest of the address: no address in
        // Redis in clear.
        let who = match candidate.user_id {
            Some(user) => format!("u:{}", digest(&[user])),
            None => format!("a:{}", digest(&[candidate.channel, candidate.address])),
        };
        let prefix = &self.settings.key_prefix;
        if let Some(window) = preferences
            .dedup_window
            .as_deref()
            .and_then(herald_amqp::parse_delay)
            .filter(|w| !w.is_zero())
        {
            let content = serde_json::to_string(candidate.payload).unwrap_or_default();
            let key = format!(
                "{prefix}renderer:dedup:{}:{}",
                candidate.tenant,
                digest(&[&who, candidate.template, &content])
            );
            let first: i64 = self
                .dedup
                .key(key)
                .arg(candidate.delivery_id)
                .arg(window_ms(window))
                .invoke_async(&mut self.connection().await?)
                .await?;
            if first == 0 {
                return Ok(Verdict::Suppress {
                    reason: "duplicate",
                    detail: format!(
                        "the same content of `{}` went to this recipient within {}",
                        candidate.template,
                        preferences.dedup_window.as_deref().unwrap_or_default()
                    ),
                });
            }
        }
        for cap in preferences.frequency_caps.iter().flatten() {
            let scope = match (&cap.category, &cap.template) {
                (Some(category), _) if category != candidate.category => continue,
                (Some(category), _) => format!("category:{category}"),
                (None, Some(template)) if template != candidate.template => continue,
                (None, Some(template)) => format!("template:{template}"),
                (None, None) => "all".to_string(),
            };
            let Some(window) = herald_amqp::parse_delay(&cap.window).filter(|w| !w.is_zero())
            else {
                continue;
            };
            let key = format!(
                "{prefix}renderer:cap:{}:{who}:{}",
                candidate.tenant,
                digest(&[&scope])
            );
            let allowed: i64 = self
                .cap
                .key(key)
                .arg(candidate.delivery_id)
                .arg(cap.max)
                .arg(window_ms(window))
                .invoke_async(&mut self.connection().await?)
                .await?;
            if allowed == 0 {
                return Ok(Verdict::Suppress {
                    reason: "frequency_cap",
                    detail: format!("more than {} per {} for {scope}", cap.max, cap.window),
                });
            }
        }
        Ok(Verdict::Send)
    }
}

fn window_ms(window: std::time::Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
}

/// When quiet hours that cover `at` end, in `timezone` (`None`: not quiet at `at`). A window
/// whose end is before its start runs over midnight; a start equal to the end is no window.
pub fn quiet_until(
    at: DateTime<Utc>,
    timezone: chrono_tz::Tz,
    quiet: &QuietHours,
) -> Option<DateTime<Utc>> {
    let (start, end) = (quiet.start, quiet.end);
    if start == end {
        return None;
    }
    let local = at.with_timezone(&timezone);
    let time = local.time();
    let (inside, end_date) = if start < end {
        (time >= start && time < end, local.date_naive())
    } else if time >= start {
        (true, local.date_naive().succ_opt()?)
    } else {
        (time < end, local.date_naive())
    };
    if !inside {
        return None;
    }
    local_to_utc(timezone, end_date.and_time(end))
}

/// A local time as UTC; one skipped by a DST jump is taken an hour later.
fn local_to_utc(timezone: chrono_tz::Tz, local: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
    timezone
        .from_local_datetime(&local)
        .earliest()
        .or_else(|| {
            timezone
                .from_local_datetime(&(local + chrono::Duration::hours(1)))
                .earliest()
        })
        .map(|d| d.with_timezone(&Utc))
}

/// The time zone for a recipient: their own, else the preferences' (tenant default), else UTC.
pub fn timezone_of(own: Option<&str>, preferences: &Preferences) -> chrono_tz::Tz {
    own.or(preferences.timezone.as_deref())
        .and_then(|tz| tz.parse().ok())
        .unwrap_or(chrono_tz::UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(text: &str) -> Option<chrono::NaiveTime> {
        chrono::NaiveTime::parse_from_str(text, "%H:%M").ok()
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .map(|d| d.with_timezone(&Utc))
            .expect("time")
    }

    fn window(start: &str, end: &str) -> QuietHours {
        QuietHours {
            start: hm(start).expect("start"),
            end: hm(end).expect("end"),
        }
    }

    #[test]
    fn quiet_hours_over_midnight_end_the_next_morning_in_the_recipients_zone() {
        let shanghai: chrono_tz::Tz = "Asia/Shanghai".parse().expect("tz");
        // 23:30 in Shanghai.
        let until = quiet_until(
            at("2026-11-23T15:30:00Z"),
            shanghai,
            &window("22:00", "08:00"),
        );
        assert_eq!(until, Some(at("2026-11-24T00:00:00Z")));
        // 07:00 in Shanghai: the same morning.
        let until = quiet_until(
            at("2026-11-23T23:00:00Z"),
            shanghai,
            &window("22:00", "08:00"),
        );
        assert_eq!(until, Some(at("2026-11-24T00:00:00Z")));
        // 12:00 in Shanghai: not quiet.
        assert_eq!(
            quiet_until(
                at("2026-11-24T04:00:00Z"),
                shanghai,
                &window("22:00", "08:00")
            ),
            None
        );
    }

    #[test]
    fn daytime_windows_and_empty_windows() {
        let utc = chrono_tz::UTC;
        assert_eq!(
            quiet_until(at("2026-11-23T13:00:00Z"), utc, &window("12:00", "14:00")),
            Some(at("2026-11-23T14:00:00Z"))
        );
        assert_eq!(
            quiet_until(at("2026-11-23T14:00:00Z"), utc, &window("12:00", "14:00")),
            None
        );
        assert_eq!(
            quiet_until(at("2026-11-23T13:00:00Z"), utc, &window("12:00", "12:00")),
            None
        );
    }

    #[test]
    fn a_window_ending_in_a_dst_gap_ends_an_hour_later() {
        let new_york: chrono_tz::Tz = "America/New_York".parse().expect("tz");
        // 2026-03-08 02:30 does not exist in New York (clocks jump 02:00 -> 03:00).
        let until = quiet_until(
            at("2026-03-08T06:30:00Z"),
            new_york,
            &window("22:00", "02:30"),
        );
        assert_eq!(until, Some(at("2026-03-08T07:30:00Z")));
    }
}
