//! A circuit breaker per provider account.
//!
//! When an account's calls keep failing at the transport level (timeouts, resets, 5xx, WeChat's
//! `-1` busy), more calls only burn the deliveries' attempts and load a provider that is down.
//! After `failure_threshold` such failures in a row the breaker opens: jobs for the account go
//! back through a delay tier without a call and without using an attempt. When the open period
//! ends, one job is let through as a probe (half-open); its success closes the breaker, its
//! failure opens it again for twice as long (up to `max_open_ms`).
//!
//! State is per replica (like Envoy's outlier detection): each replica learns on its own
//! calls, which needs no coordination and cannot be wrong about what it saw itself.
//! Hand-written rather than `failsafe`: the sender needs the time left (to pick the delay tier)
//! and a single probe in half-open, which that crate does not expose.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// `[sender.breaker]` in herald.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BreakerSettings {
    /// Transport-level failures in a row that open the breaker; 0 turns breakers off.
    pub failure_threshold: u32,
    /// How long the breaker stays open the first time.
    pub open_ms: u64,
    /// The longest it stays open after failed probes.
    pub max_open_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_ms: 30_000,
            max_open_ms: 300_000,
        }
    }
}

/// What the breaker says about calling an account now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call.
    Call,
    /// Call: this is the probe that decides whether the breaker closes.
    Probe,
    /// Do not call; ask again after this long.
    Wait(Duration),
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        period: Duration,
    },
    /// A probe went out at `since`; one that never reports (its job was rescheduled before
    /// calling) is replaced after another `period`.
    HalfOpen {
        period: Duration,
        since: Instant,
    },
}

#[derive(Debug)]
pub struct Breakers {
    settings: BreakerSettings,
    accounts: Mutex<HashMap<String, State>>,
}

impl Breakers {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, State>) -> T) -> T {
        let mut accounts = match self.accounts.lock() {
            Ok(accounts) => accounts,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut accounts)
    }

    /// May a job for `account` call the provider now?
    pub fn admit(&self, account: &str) -> Admission {
        if self.settings.failure_threshold == 0 {
            return Admission::Call;
        }
        let now = Instant::now();
        self.with(|accounts| match accounts.get(account).copied() {
            None | Some(State::Closed { .. }) => Admission::Call,
            Some(State::Open { until, period }) if now >= until => {
                accounts.insert(account.to_string(), State::HalfOpen { period, since: now });
                Admission::Probe
            }
            Some(State::Open { until, .. }) => Admission::Wait(until - now),
            Some(State::HalfOpen { period, since }) if now >= since + period => {
                accounts.insert(account.to_string(), State::HalfOpen { period, since: now });
                Admission::Probe
            }
            // The probe is out: the others wait about as long as a call may take.
            Some(State::HalfOpen { .. }) => Admission::Wait(Duration::from_secs(1)),
        })
    }

    /// The provider answered (whatever it said): the account is reachable.
    pub fn succeeded(&self, provider: &'static str, account: &str) {
        if self.settings.failure_threshold == 0 {
            return;
        }
        let closed = self.with(|accounts| {
            let was = accounts.insert(account.to_string(), State::Closed { failures: 0 });
            !matches!(was, None | Some(State::Closed { .. }))
        });
        if closed {
            tracing::info!(account, "provider answers again: circuit breaker closed");
            gauge(provider, account, 0.0);
        }
    }

    /// A transport-level failure (or the provider saying it is busy).
    pub fn failed(&self, provider: &'static str, account: &str) {
        let threshold = self.settings.failure_threshold;
        if threshold == 0 {
            return;
        }
        let first = Duration::from_millis(self.settings.open_ms);
        let max = Duration::from_millis(self.settings.max_open_ms).max(first);
        let opened = self.with(|accounts| {
            let state = accounts
                .get(account)
                .copied()
                .unwrap_or(State::Closed { failures: 0 });
            let period = match state {
                State::Closed { failures } if failures + 1 < threshold => {
                    accounts.insert(
                        account.to_string(),
                        State::Closed {
                            failures: failures + 1,
                        },
                    );
                    return None;
                }
                State::Closed { .. } => first,
                // The probe failed: stay away twice as long.
                State::HalfOpen { period, .. } => (period * 2).min(max),
                // A call admitted before the breaker opened: already open.
                State::Open { .. } => return None,
            };
            accounts.insert(
                account.to_string(),
                State::Open {
                    until: Instant::now() + period,
                    period,
                },
            );
            Some(period)
        });
        if let Some(period) = opened {
            tracing::warn!(
                account,
                ?period,
                "provider keeps failing: circuit breaker open; its jobs wait without calling"
            );
            gauge(provider, account, 1.0);
        }
    }

    /// Accounts whose breaker is not closed (for `/readyz` detail).
    pub fn open_accounts(&self) -> Vec<String> {
        let mut open: Vec<String> = self.with(|accounts| {
            accounts
                .iter()
                .filter(|(_, state)| !matches!(state, State::Closed { .. }))
                .map(|(account, _)| account.clone())
                .collect()
        });
        open.sort();
        open
    }
}

fn gauge(provider: &'static str, account: &str, value: f64) {
    metrics::gauge!(crate::meters::BREAKER_OPEN, "provider" => provider, "account" => account.to_string())
        .set(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers(threshold: u32) -> Breakers {
        Breakers::new(BreakerSettings {
            failure_threshold: threshold,
            open_ms: 1_000,
            max_open_ms: 3_000,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_in_a_row_probes_once_and_closes_on_success() {
        let b = breakers(3);
        b.failed("wechat", "a");
        b.failed("wechat", "a");
        b.succeeded("wechat", "a"); // a success in between starts the count over
        b.failed("wechat", "a");
        b.failed("wechat", "a");
        assert_eq!(b.admit("a"), Admission::Call);
        b.failed("wechat", "a");
        assert_eq!(b.admit("a"), Admission::Wait(Duration::from_secs(1)));
        assert_eq!(b.admit("other"), Admission::Call, "accounts are separate");
        assert_eq!(b.open_accounts(), vec!["a".to_string()]);

        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(b.admit("a"), Admission::Probe);
        assert!(
            matches!(b.admit("a"), Admission::Wait(_)),
            "one probe at a time"
        );
        b.succeeded("wechat", "a");
        assert_eq!(b.admit("a"), Admission::Call);
        assert!(b.open_accounts().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_is_replaced() {
        let b = breakers(1);
        b.failed("wechat", "a");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit("a"), Admission::Probe);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(matches!(b.admit("a"), Admission::Wait(_)));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.admit("a"), Admission::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_doubles_the_open_period_up_to_the_maximum() {
        let b = breakers(1);
        b.failed("wechat", "a");
        for expected in [2_000, 3_000, 3_000] {
            tokio::time::advance(Duration::from_secs(3)).await;
            assert_eq!(b.admit("a"), Admission::Probe);
            b.failed("wechat", "a");
            assert_eq!(
                b.admit("a"),
                Admission::Wait(Duration::from_millis(expected))
            );
        }
    }

    #[test]
    fn threshold_zero_turns_breakers_off() {
        let b = breakers(0);
        for _ in 0..10 {
            b.failed("wechat", "a");
        }
        assert_eq!(b.admit("a"), Admission::Call);
    }
}
