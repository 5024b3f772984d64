//! Retry policy per channel: the delay tiers a retry walks, when to give up (attempts, age),
//! when a daily quota resets, and the default rate limit of the channel's accounts.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, NaiveTime, TimeZone, Utc};
use herald_amqp::{RetryTier, Topology, parse_delay};
use serde::{Deserialize, Serialize};

use crate::channel::Defer;
use crate::limit::RateLimit;

/// `[sender.policies."<channel>"]`: any field left out takes the `[sender]` default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyOverride {
    /// Tier names (from `amqp.retry_tiers`) the n-th retry waits in; the last one repeats.
    pub retry_schedule: Option<Vec<String>>,
    /// Attempts (deferrals and rate-limit reschedules not counted) before giving up.
    pub max_attempts: Option<u32>,
    /// Give up retrying once the delivery is this old (`24h`, `90m`).
    pub max_age: Option<String>,
    /// When the provider's daily quota resets, `HH:MM[:SS]±HH:MM`.
    pub quota_reset: Option<String>,
    /// Rate limit of each account on this channel unless `[sender.accounts]` names one.
    pub rate_limit: Option<RateLimit>,
    /// A delivery with a fallback chain that would still be unsent this long after it was
    /// created (a retry or a deferral would take it past) goes to its next channel instead
    /// (`10m`). Unset: only recipient failures and give-ups fall back.
    pub fallback_after: Option<String>,
}

/// One channel's policy, checked against the topology.
#[derive(Debug, Clone)]
pub struct Policy {
    pub schedule: Vec<RetryTier>,
    pub max_attempts: u32,
    pub max_age: Duration,
    pub quota_reset: QuotaReset,
    pub rate_limit: Option<RateLimit>,
    pub fallback_after: Option<Duration>,
}

/// What to do with a job whose attempt did not settle it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Wait in this tier, then try again.
    Retry(RetryTier),
    /// Stop: the delivery fails and the job is parked (`exhausted`), for this reason.
    GiveUp(String),
}

impl Policy {
    /// After attempt `attempt` (1-based) failed transiently.
    pub fn after_failure(
        &self,
        attempt: u32,
        created_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Next {
        if attempt >= self.max_attempts {
            return Next::GiveUp(format!("gave up after {attempt} attempts"));
        }
        let index = (attempt.max(1) as usize - 1).min(self.schedule.len().saturating_sub(1));
        let Some(tier) = self.schedule.get(index) else {
            return Next::GiveUp("no retry tier configured".into());
        };
        if self.too_old(created_at, now + tier.delay) {
            return Next::GiveUp(self.age_reason());
        }
        Next::Retry(tier.clone())
    }

    /// Whether a delivery created at `created_at` and not sent before `until` is past this
    /// channel's fallback deadline.
    pub fn past_fallback_deadline(&self, created_at: DateTime<Utc>, until: DateTime<Utc>) -> bool {
        self.fallback_after
            .and_then(|after| chrono::Duration::from_std(after).ok())
            .is_some_and(|after| until - created_at > after)
    }

    /// Until when a deferral holds the job; `Err` with the reason if that is past the maximum age.
    pub fn defer_until(
        &self,
        defer: Defer,
        created_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, String> {
        let until = match defer {
            Defer::QuotaReset => self.quota_reset.next_after(now),
            Defer::For(wait) => now + wait,
        };
        if self.too_old(created_at, until) {
            return Err(self.age_reason());
        }
        Ok(until)
    }

    fn too_old(&self, created_at: DateTime<Utc>, at: DateTime<Utc>) -> bool {
        (at - created_at)
            .to_std()
            .is_ok_and(|age| age > self.max_age)
    }

    fn age_reason(&self) -> String {
        format!(
            "gave up: the delivery would be older than {}s",
            self.max_age.as_secs()
        )
    }
}

/// A daily reset time in a fixed offset (WeChat: `00:00+08:00`, midnight in Beijing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaReset {
    pub time: NaiveTime,
    pub offset: FixedOffset,
}

impl QuotaReset {
    /// Parses `HH:MM[:SS]±HH:MM`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let split = text.rfind(['+', '-'])?;
        let (time, offset) = text.split_at(split);
        let time = NaiveTime::parse_from_str(time, "%H:%M:%S")
            .or_else(|_| NaiveTime::parse_from_str(time, "%H:%M"))
            .ok()?;
        let offset: FixedOffset = offset.parse().ok()?;
        Some(Self { time, offset })
    }

    /// The first reset strictly after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let local = now.with_timezone(&self.offset);
        let mut day = local.date_naive();
        loop {
            if let Some(at) = self
                .offset
                .from_local_datetime(&day.and_time(self.time))
                .single()
                .map(|t| t.with_timezone(&Utc))
                && at > now
            {
                return at;
            }
            match day.succ_opt() {
                Some(next) => day = next,
                None => return now + chrono::Duration::days(1),
            }
        }
    }
}

/// The `[sender]` defaults every channel policy starts from.
#[derive(Debug, Clone)]
pub struct Defaults<'a> {
    pub retry_schedule: &'a [String],
    pub max_attempts: u32,
    pub max_age: &'a str,
    pub quota_reset: &'a str,
    pub rate_limit: Option<RateLimit>,
}

/// Resolves each channel's policy; fails naming the setting at fault.
pub fn resolve(
    channels: &[String],
    defaults: &Defaults<'_>,
    overrides: &BTreeMap<String, PolicyOverride>,
    topology: &Topology,
) -> Result<BTreeMap<String, Policy>, String> {
    if let Some(unknown) = overrides.keys().find(|c| !channels.contains(c)) {
        tracing::warn!(channel = %unknown, "sender.policies names a channel this worker does not serve");
    }
    let mut policies = BTreeMap::new();
    for channel in channels {
        let o = overrides.get(channel).cloned().unwrap_or_default();
        let at = |field: &str| match overrides.contains_key(channel) {
            true => format!("sender.policies.\"{channel}\".{field}"),
            false => format!("sender.{field}"),
        };
        let names = o
            .retry_schedule
            .unwrap_or_else(|| defaults.retry_schedule.to_vec());
        let schedule = if names.is_empty() {
            topology.retry_tiers().to_vec()
        } else {
            names
                .iter()
                .map(|name| {
                    topology.tier(name).cloned().ok_or_else(|| {
                        format!(
                            "{}: `{name}` is not one of amqp.retry_tiers",
                            at("retry_schedule")
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let max_age_text = o.max_age.unwrap_or_else(|| defaults.max_age.to_string());
        let max_age = parse_delay(&max_age_text)
            .ok_or_else(|| format!("{}: `{max_age_text}` is not like 24h", at("max_age")))?;
        let reset_text = o
            .quota_reset
            .unwrap_or_else(|| defaults.quota_reset.to_string());
        let quota_reset = QuotaReset::parse(&reset_text).ok_or_else(|| {
            format!(
                "{}: `{reset_text}` is not like 00:00+08:00",
                at("quota_reset")
            )
        })?;
        let max_attempts = o.max_attempts.unwrap_or(defaults.max_attempts).max(1);
        let fallback_after = match &o.fallback_after {
            Some(text) => Some(
                parse_delay(text)
                    .ok_or_else(|| format!("{}: `{text}` is not like 10m", at("fallback_after")))?,
            ),
            None => None,
        };
        policies.insert(
            channel.clone(),
            Policy {
                schedule,
                max_attempts,
                max_age,
                quota_reset,
                rate_limit: o.rate_limit.or(defaults.rate_limit),
                fallback_after,
            },
        );
    }
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_amqp::AmqpSettings;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    }

    fn policy(schedule: &[&str], max_attempts: u32) -> Policy {
        let topology = Topology::new(&AmqpSettings::default()).expect("topology");
        let names: Vec<String> = schedule.iter().map(|s| s.to_string()).collect();
        let defaults = Defaults {
            retry_schedule: &names,
            max_attempts,
            max_age: "24h",
            quota_reset: "00:00+08:00",
            rate_limit: None,
        };
        let channels = vec!["wechat.template".to_string()];
        resolve(&channels, &defaults, &BTreeMap::new(), &topology)
            .expect("valid")
            .remove("wechat.template")
            .expect("policy")
    }

    #[test]
    fn quota_resets_at_beijing_midnight() {
        let reset = QuotaReset::parse("00:00+08:00").expect("parses");
        // 15:30 UTC is 23:30 in Beijing.
        assert_eq!(
            reset.next_after(at("2026-11-23T15:30:00Z")),
            at("2026-11-23T16:00:00Z")
        );
        // Just after midnight in Beijing: the next one is a day later.
        assert_eq!(
            reset.next_after(at("2026-11-23T16:00:01Z")),
            at("2026-11-24T16:00:00Z")
        );
        let odd = QuotaReset::parse("06:30:15-05:00").expect("parses");
        assert_eq!(
            odd.next_after(at("2026-11-23T00:00:00Z")),
            at("2026-11-23T11:30:15Z")
        );
        assert!(QuotaReset::parse("midnight").is_none());
        assert!(QuotaReset::parse("25:00+08:00").is_none());
    }

    #[test]
    fn retries_walk_the_schedule_and_give_up() {
        let p = policy(&["1s", "30s"], 3);
        let created = at("2026-11-23T10:00:00Z");
        let now = at("2026-11-23T10:00:05Z");
        assert_eq!(
            p.after_failure(1, created, now),
            Next::Retry(p.schedule[0].clone())
        );
        assert_eq!(
            p.after_failure(2, created, now),
            Next::Retry(p.schedule[1].clone())
        );
        assert!(
            matches!(p.after_failure(3, created, now), Next::GiveUp(r) if r.contains("3 attempts"))
        );
        // Past the maximum age, even with attempts left.
        let late = at("2026-11-24T09:59:59.500Z");
        assert!(
            matches!(p.after_failure(1, created, late), Next::GiveUp(r) if r.contains("older"))
        );
    }

    #[test]
    fn deferrals_stop_at_the_maximum_age() {
        let p = policy(&[], 8);
        assert_eq!(p.schedule.len(), AmqpSettings::default().retry_tiers.len());
        let created = at("2026-11-23T10:00:00Z");
        assert_eq!(
            p.defer_until(Defer::QuotaReset, created, at("2026-11-23T15:00:00Z")),
            Ok(at("2026-11-23T16:00:00Z"))
        );
        assert!(
            p.defer_until(Defer::QuotaReset, created, at("2026-11-24T09:00:00Z"))
                .is_err()
        );
    }

    #[test]
    fn unknown_tiers_are_refused() {
        let topology = Topology::new(&AmqpSettings::default()).expect("topology");
        let names = vec!["7s".to_string()];
        let defaults = Defaults {
            retry_schedule: &names,
            max_attempts: 8,
            max_age: "24h",
            quota_reset: "00:00+08:00",
            rate_limit: None,
        };
        let err = resolve(
            &["wechat.template".to_string()],
            &defaults,
            &BTreeMap::new(),
            &topology,
        )
        .expect_err("7s is not a tier");
        assert!(err.contains("sender.retry_schedule"), "{err}");
    }
}
