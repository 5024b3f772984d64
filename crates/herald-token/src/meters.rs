//! The token service's metrics, through the `metrics` facade (no exporter is installed here:
//! whoever runs the service installs a recorder; without one every call is a no-op).
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `herald_token_fetches_total` | counter | `account`, `outcome` = ok, transient_error, config_error |
//! | `herald_token_refreshes_total` | counter | `account`, `cause` = proactive, invalidated, cold |
//! | `herald_token_age_seconds` | gauge | `account` |
//! | `herald_token_daily_fetches` | gauge | `account` |
//! | `herald_token_daily_limit` | gauge | `account` (not set for WeCom: limit unknown) |
//! | `herald_token_account_misconfigured` | gauge | `account` (0 or 1) |

use chrono::{DateTime, FixedOffset, Utc};
use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};

use crate::config::{AccountKind, TokenEndpoint};

pub(crate) const FETCHES: &str = "herald_token_fetches_total";
pub(crate) const REFRESHES: &str = "herald_token_refreshes_total";
pub(crate) const AGE: &str = "herald_token_age_seconds";
pub(crate) const DAILY_FETCHES: &str = "herald_token_daily_fetches";
pub(crate) const DAILY_LIMIT: &str = "herald_token_daily_limit";
pub(crate) const MISCONFIGURED: &str = "herald_token_account_misconfigured";

/// WeChat's `/cgi-bin/token` quota.
const CLASSIC_DAILY_LIMIT: u64 = 2_000;
/// WeChat's `/cgi-bin/stable_token` quota in normal mode (`force_refresh`: 20 a day).
const STABLE_DAILY_LIMIT: u64 = 500_000;

/// How one call to a token endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// Anything worth trying again later: transport, 5xx, system busy, quota.
    TransientError,
    /// The provider refused the account's configuration (wrong secret, appid, IP).
    ConfigError,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::TransientError => "transient_error",
            Outcome::ConfigError => "config_error",
        }
    }
}

/// Why a new token was fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The background task renewed a token past `refresh_at` of its lifetime.
    Proactive,
    /// A caller reported the current token rejected.
    Invalidated,
    /// There was no usable token: none yet, lost, expired or about to.
    Cold,
}

impl Cause {
    fn label(self) -> &'static str {
        match self {
            Cause::Proactive => "proactive",
            Cause::Invalidated => "invalidated",
            Cause::Cold => "cold",
        }
    }
}

/// Describes every metric to the installed recorder (idempotent).
pub(crate) fn describe() {
    describe_counter!(
        FETCHES,
        "Calls to the provider's token endpoint, by account and outcome"
    );
    describe_counter!(
        REFRESHES,
        "New tokens obtained, by account and cause (proactive, invalidated, cold)"
    );
    describe_gauge!(
        AGE,
        Unit::Seconds,
        "Time since the token last handed out was fetched"
    );
    describe_gauge!(
        DAILY_FETCHES,
        "Calls to the token endpoint today (Beijing day), across replicas"
    );
    describe_gauge!(
        DAILY_LIMIT,
        "The provider's daily quota of token calls for the account"
    );
    describe_gauge!(
        MISCONFIGURED,
        "1 while the provider refuses the account's configuration"
    );
}

/// The provider's daily quota of token calls for an account; `None` when unknown (WeCom).
pub(crate) fn daily_limit(kind: AccountKind, endpoint: TokenEndpoint) -> Option<u64> {
    match (kind, endpoint) {
        (AccountKind::WecomApp, _) => None,
        (_, TokenEndpoint::Classic) => Some(CLASSIC_DAILY_LIMIT),
        (_, TokenEndpoint::Stable) => Some(STABLE_DAILY_LIMIT),
    }
}

/// The day WeChat's daily quotas count in (they reset at midnight Beijing time), `YYYYMMDD`.
pub(crate) fn beijing_day(now: DateTime<Utc>) -> String {
    let beijing = FixedOffset::east_opt(8 * 3600).map(|tz| now.with_timezone(&tz).date_naive());
    beijing
        .unwrap_or_else(|| now.date_naive())
        .format("%Y%m%d")
        .to_string()
}

pub(crate) fn fetched(account: &str, outcome: Outcome) {
    counter!(FETCHES, "account" => account.to_string(), "outcome" => outcome.label()).increment(1);
}

pub(crate) fn refreshed(account: &str, cause: Cause) {
    counter!(REFRESHES, "account" => account.to_string(), "cause" => cause.label()).increment(1);
}

pub(crate) fn age(account: &str, fetched_at: DateTime<Utc>, now: DateTime<Utc>) {
    let seconds = (now - fetched_at).num_milliseconds().max(0) as f64 / 1000.0;
    gauge!(AGE, "account" => account.to_string()).set(seconds);
}

pub(crate) fn daily_fetches(account: &str, count: u64) {
    gauge!(DAILY_FETCHES, "account" => account.to_string()).set(count as f64);
}

pub(crate) fn set_daily_limit(account: &str, limit: Option<u64>) {
    if let Some(limit) = limit {
        gauge!(DAILY_LIMIT, "account" => account.to_string()).set(limit as f64);
    }
}

pub(crate) fn misconfigured(account: &str, misconfigured: bool) {
    gauge!(MISCONFIGURED, "account" => account.to_string()).set(if misconfigured {
        1.0
    } else {
        0.0
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beijing_day_rolls_over_at_16_utc() {
        let before = DateTime::parse_from_rfc3339("2025-03-01T15:59:59Z")
            .map(|t| t.with_timezone(&Utc))
            .expect("time");
        let after = DateTime::parse_from_rfc3339("2025-03-01T16:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .expect("time");
        assert_eq!(beijing_day(before), "20250301");
        assert_eq!(beijing_day(after), "20250302");
    }

    #[test]
    fn daily_limits_by_endpoint() {
        use AccountKind::*;
        assert_eq!(
            daily_limit(WechatOfficialAccount, TokenEndpoint::Classic),
            Some(2000)
        );
        assert_eq!(
            daily_limit(WechatMiniProgram, TokenEndpoint::Stable),
            Some(500_000)
        );
        assert_eq!(daily_limit(WecomApp, TokenEndpoint::Stable), None);
        assert_eq!(daily_limit(WecomApp, TokenEndpoint::Classic), None);
    }
}
