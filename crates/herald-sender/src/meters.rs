//! The sender's metrics, through the `metrics` facade (whoever runs the service installs a
//! recorder; without one every call is a no-op).
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `herald_sender_outcomes_total` | counter | `channel`, `outcome` = sent, retrying, deferred, failed, exhausted, `code` (provider errcode, `transport`, `token`, …) |
//! | `herald_sender_alerts_total` | counter | `channel`, `account`, `kind` = config, template, quota, ip_blocked, unknown_code |
//! | `herald_sender_rate_limited_total` | counter | `channel`, `account`, `action` = waited, rescheduled, late (reached its slot too late and took a new one) |
//! | `herald_sender_rate_limiter_fallback_total` | counter | `account` (Redis unreachable: the local limiter decided) |
//! | `herald_sender_provider_call_seconds` | histogram | `channel` |
//! | `herald_sender_retries_total` | counter | `channel`, `tier` |
//! | `herald_rate_limit_wait_seconds` | histogram | `account` (time from asking for a slot to sending) |
//! | `herald_provider_answers_total` | counter | `provider`, `code` (errcode, or `transport`) |
//! | `herald_breaker_open` | gauge | `provider`, `account` (1 while the account's circuit breaker is open or probing) |
//! | `herald_sender_breaker_deferred_total` | counter | `channel`, `account` (jobs sent back to wait, uncalled, while the breaker was open) |

use std::time::Duration;

use metrics::{counter, describe_counter, describe_histogram, histogram};

pub const OUTCOMES: &str = "herald_sender_outcomes_total";
pub const ALERTS: &str = "herald_sender_alerts_total";
pub const BREAKER_OPEN: &str = "herald_breaker_open";
pub const BREAKER_DEFERRED: &str = "herald_sender_breaker_deferred_total";
pub const RATE_LIMITED: &str = "herald_sender_rate_limited_total";
pub const LIMITER_FALLBACK: &str = "herald_sender_rate_limiter_fallback_total";
pub const PROVIDER_CALL: &str = "herald_sender_provider_call_seconds";
pub const RETRIES: &str = "herald_sender_retries_total";
pub const RATE_LIMIT_WAIT: &str = "herald_rate_limit_wait_seconds";
pub const PROVIDER_ANSWERS: &str = "herald_provider_answers_total";

/// Describes every metric once (for exporters that show help texts).
pub fn describe() {
    describe_counter!(OUTCOMES, "Send attempts by how they ended");
    describe_counter!(
        ALERTS,
        "Failures an operator must fix: account or template configuration, quotas, unknown codes"
    );
    describe_counter!(
        RATE_LIMITED,
        "Jobs that waited for, or were rescheduled by, a rate limit"
    );
    describe_counter!(
        LIMITER_FALLBACK,
        "Rate-limit decisions taken by the local limiter because Redis was unreachable"
    );
    describe_histogram!(
        PROVIDER_CALL,
        metrics::Unit::Seconds,
        "Provider call latency"
    );
    describe_counter!(RETRIES, "Retries published, by delay tier");
    metrics::describe_gauge!(
        BREAKER_OPEN,
        "1 while a provider account's circuit breaker is open or probing"
    );
    describe_counter!(
        BREAKER_DEFERRED,
        "Jobs sent back to wait, without a call, while their account's breaker was open"
    );
    describe_histogram!(
        RATE_LIMIT_WAIT,
        metrics::Unit::Seconds,
        "Time a job waited for its rate-limit slot"
    );
    describe_counter!(PROVIDER_ANSWERS, "Provider answers by errcode");
}

pub fn retry(channel: &str, tier: &str) {
    counter!(RETRIES, "channel" => channel.to_string(), "tier" => tier.to_string()).increment(1);
}

pub fn rate_limit_wait(account: &str, waited: Duration) {
    histogram!(RATE_LIMIT_WAIT, "account" => account.to_string()).record(waited.as_secs_f64());
}

pub fn provider_answer(provider: &'static str, code: &str) {
    counter!(PROVIDER_ANSWERS, "provider" => provider, "code" => code.to_string()).increment(1);
}

pub fn outcome(channel: &str, outcome: &'static str, code: &str) {
    counter!(OUTCOMES, "channel" => channel.to_string(), "outcome" => outcome, "code" => code.to_string())
        .increment(1);
}

pub fn alert(channel: &str, account: &str, kind: &'static str) {
    counter!(ALERTS, "channel" => channel.to_string(), "account" => account.to_string(), "kind" => kind)
        .increment(1);
}

pub fn rate_limited(channel: &str, account: &str, action: &'static str) {
    counter!(RATE_LIMITED, "channel" => channel.to_string(), "account" => account.to_string(), "action" => action)
        .increment(1);
}

pub fn breaker_deferred(channel: &str, account: &str) {
    counter!(BREAKER_DEFERRED, "channel" => channel.to_string(), "account" => account.to_string())
        .increment(1);
}

pub fn limiter_fallback(account: &str) {
    counter!(LIMITER_FALLBACK, "account" => account.to_string()).increment(1);
}

pub fn provider_call(channel: &str, took: Duration) {
    histogram!(PROVIDER_CALL, "channel" => channel.to_string()).record(took.as_secs_f64());
}
