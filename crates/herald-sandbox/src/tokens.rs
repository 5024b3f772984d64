//! Access tokens: `/cgi-bin/token` and `/cgi-bin/stable_token`, two independent families.
//!
//! `/cgi-bin/token` issues a new token on every call and the previous one keeps working for a
//! grace period. `/cgi-bin/stable_token` hands out the same token until 5 minutes before it
//! expires (`stable_reissue_window_secs`); `force_refresh` replaces it at once, rate-limited
//! (30 s apart, 20 a day).
//!
//! Test knobs, not WeChat behaviour: calls are counted per appid ([`TokenCalls`]), and every
//! current token of an app can be invalidated (40001 from then on) or expired (42001) on command.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, FixedOffset, NaiveDate, TimeDelta, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::wx_error::{
    ACCESS_TOKEN_EXPIRED, APPID_MISSING, APPSECRET_MISSING, DAILY_QUOTA, DATA_FORMAT_ERROR,
    INVALID_APPID, INVALID_APPSECRET, INVALID_CREDENTIAL, INVALID_GRANT_TYPE, MINUTE_QUOTA,
    WxError,
};
use crate::{Sandbox, SandboxApp, paths};

/// Minimum spacing between two `force_refresh` calls of one app.
const FORCE_SPACING: TimeDelta = TimeDelta::seconds(30);
const FORCES_PER_DAY: u32 = 20;
const TOKEN_CALLS_PER_DAY: u32 = 2000;
/// Expired tokens are forgotten this long after expiry (then they answer 40001, not 42001).
const FORGET_AFTER: TimeDelta = TimeDelta::days(1);

struct TokenRecord {
    appid: String,
    expires_at: DateTime<Utc>,
    /// Set when superseded (plain family) or force-refreshed away (stable family).
    revoked_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct AppTokens {
    plain: Option<String>,
    stable: Option<String>,
    last_force: Option<DateTime<Utc>>,
    forces: DailyCounter,
    plain_calls: DailyCounter,
}

/// Counts calls per day; WeChat's daily quotas reset at midnight Beijing time.
#[derive(Default)]
struct DailyCounter {
    day: Option<NaiveDate>,
    count: u32,
}

impl DailyCounter {
    fn today(&mut self, now: DateTime<Utc>) -> &mut u32 {
        let beijing = FixedOffset::east_opt(8 * 3600).map(|tz| now.with_timezone(&tz).date_naive());
        let day = beijing.unwrap_or_else(|| now.date_naive());
        if self.day != Some(day) {
            self.day = Some(day);
            self.count = 0;
        }
        &mut self.count
    }
}

/// How often the token endpoints were called for one appid since the sandbox started, whatever
/// the answer (refused calls count too: a client retrying a wrong secret shows up here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCalls {
    /// `GET /cgi-bin/token`.
    pub classic: u64,
    /// `POST /cgi-bin/stable_token`, forced or not.
    pub stable: u64,
    /// The `stable` calls that asked for `force_refresh`.
    pub stable_forced: u64,
}

#[derive(Default)]
pub(crate) struct TokenStore {
    tokens: HashMap<String, TokenRecord>,
    apps: HashMap<String, AppTokens>,
    calls: HashMap<String, TokenCalls>,
}

/// A token answer: the token and its `expires_in`.
pub(crate) struct Issued {
    pub(crate) token: String,
    pub(crate) expires_in: i64,
}

impl TokenStore {
    pub(crate) fn calls(&self, appid: &str) -> TokenCalls {
        self.calls.get(appid).copied().unwrap_or_default()
    }

    fn count_call(&mut self, appid: Option<&str>, count: impl FnOnce(&mut TokenCalls)) {
        if let Some(appid) = appid.filter(|appid| !appid.is_empty()) {
            count(self.calls.entry(appid.to_owned()).or_default());
        }
    }

    /// Every token of `appid` still working answers 40001 from `now` on. Returns how many.
    pub(crate) fn invalidate(&mut self, appid: &str, now: DateTime<Utc>) -> usize {
        let mut invalidated = 0;
        for record in self.tokens.values_mut() {
            let working = now < record.expires_at && record.revoked_at.is_none_or(|at| now < at);
            if record.appid == appid && working {
                record.revoked_at = Some(now);
                invalidated += 1;
            }
        }
        invalidated
    }

    /// Every token of `appid` not yet expired expires at `now` (42001 from then on). Returns
    /// how many.
    pub(crate) fn expire(&mut self, appid: &str, now: DateTime<Utc>) -> usize {
        let mut expired = 0;
        for record in self.tokens.values_mut() {
            if record.appid == appid && now < record.expires_at {
                record.expires_at = now;
                expired += 1;
            }
        }
        expired
    }

    /// The appid a token belongs to, or WeChat's answer for a bad token.
    pub(crate) fn check(&self, token: &str, now: DateTime<Utc>) -> Result<&str, WxError> {
        let record = self
            .tokens
            .get(token)
            .ok_or_else(|| WxError::new(INVALID_CREDENTIAL))?;
        if now >= record.expires_at {
            return Err(WxError::new(ACCESS_TOKEN_EXPIRED));
        }
        if record.revoked_at.is_some_and(|at| now >= at) {
            // Superseded: WeChat says "invalid or not latest", not "expired".
            return Err(WxError::new(INVALID_CREDENTIAL));
        }
        Ok(&record.appid)
    }

    fn mint(&mut self, appid: &str, now: DateTime<Utc>, ttl: TimeDelta) -> String {
        self.tokens
            .retain(|_, record| now < record.expires_at + FORGET_AFTER);
        let token = new_token();
        self.tokens.insert(
            token.clone(),
            TokenRecord {
                appid: appid.to_owned(),
                expires_at: now + ttl,
                revoked_at: None,
            },
        );
        token
    }

    fn revoke(&mut self, token: Option<&String>, at: DateTime<Utc>) {
        if let Some(record) = token.and_then(|token| self.tokens.get_mut(token)) {
            // A token already on its way out keeps the earlier deadline.
            record.revoked_at = Some(record.revoked_at.map_or(at, |old| old.min(at)));
        }
    }

    /// `/cgi-bin/token`: always a new token; the previous one lives on for `grace`.
    fn plain(
        &mut self,
        appid: &str,
        now: DateTime<Utc>,
        ttl: TimeDelta,
        grace: TimeDelta,
    ) -> Result<Issued, WxError> {
        let calls = self
            .apps
            .entry(appid.to_owned())
            .or_default()
            .plain_calls
            .today(now);
        if *calls >= TOKEN_CALLS_PER_DAY {
            return Err(WxError::new(DAILY_QUOTA));
        }
        *calls += 1;
        let token = self.mint(appid, now, ttl);
        let app = self.apps.entry(appid.to_owned()).or_default();
        let previous = app.plain.replace(token.clone());
        self.revoke(previous.as_ref(), now + grace);
        Ok(Issued {
            token,
            expires_in: ttl.num_seconds(),
        })
    }

    /// `/cgi-bin/stable_token`: the current token while it has at least `reissue_window` left.
    pub(crate) fn stable(
        &mut self,
        appid: &str,
        now: DateTime<Utc>,
        ttl: TimeDelta,
        reissue_window: TimeDelta,
        force_refresh: bool,
    ) -> Result<Issued, WxError> {
        let app = self.apps.entry(appid.to_owned()).or_default();
        let current = app.stable.clone();
        if force_refresh {
            let forces = app.forces.today(now);
            if *forces >= FORCES_PER_DAY {
                return Err(WxError::new(DAILY_QUOTA));
            }
            if app
                .last_force
                .is_some_and(|last| now - last < FORCE_SPACING)
            {
                return Err(WxError::new(MINUTE_QUOTA));
            }
            *forces += 1;
            app.last_force = Some(now);
            // Forcing kills the current token at once (that is the point of forcing).
            self.revoke(current.as_ref(), now);
        } else if let Some(token) = current
            && let Some(record) = self.tokens.get(&token)
            && record.revoked_at.is_none()
            && record.expires_at - now >= reissue_window
        {
            return Ok(Issued {
                expires_in: (record.expires_at - now).num_seconds(),
                token,
            });
        }
        // New token; a naturally renewed predecessor stays valid until its own expiry.
        let token = self.mint(appid, now, ttl);
        self.apps.entry(appid.to_owned()).or_default().stable = Some(token.clone());
        Ok(Issued {
            token,
            expires_in: ttl.num_seconds(),
        })
    }
}

/// WeChat tokens look like `78_` followed by ~130 URL-safe chars.
fn new_token() -> String {
    let body: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(136)
        .map(char::from)
        .collect();
    format!("90_{body}")
}

/// The credential checks both token endpoints share, in WeChat's order.
fn authenticate(
    apps: &std::collections::BTreeMap<String, SandboxApp>,
    grant_type: Option<&str>,
    appid: Option<&str>,
    secret: Option<&str>,
) -> Result<String, WxError> {
    if grant_type != Some("client_credential") {
        return Err(WxError::new(INVALID_GRANT_TYPE));
    }
    let appid = appid
        .filter(|appid| !appid.is_empty())
        .ok_or_else(|| WxError::new(APPID_MISSING))?;
    let app = apps.get(appid).ok_or_else(|| WxError::new(INVALID_APPID))?;
    let secret = secret
        .filter(|secret| !secret.is_empty())
        .ok_or_else(|| WxError::new(APPSECRET_MISSING))?;
    if secret != app.secret {
        return Err(WxError::new(INVALID_APPSECRET));
    }
    Ok(app.appid.clone())
}

fn issued_response(issued: Issued) -> Response {
    Json(json!({ "access_token": issued.token, "expires_in": issued.expires_in })).into_response()
}

fn secs(secs: u64) -> TimeDelta {
    TimeDelta::seconds(i64::try_from(secs).unwrap_or(i64::MAX / 1000))
}

/// `GET /cgi-bin/token?grant_type=client_credential&appid=&secret=`
pub(crate) async fn token(
    State(sandbox): State<Sandbox>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let query = query.map(|Query(query)| query).unwrap_or_default();
    sandbox
        .lock()
        .tokens
        .count_call(query.get("appid").map(String::as_str), |calls| {
            calls.classic += 1;
        });
    if let Some(err) = sandbox.take_injected(paths::TOKEN) {
        return err.respond(sandbox.clock());
    }
    let now = sandbox.clock().now();
    let config = &sandbox.inner.config;
    let result = {
        let mut state = sandbox.lock();
        authenticate(
            &state.apps,
            query.get("grant_type").map(String::as_str),
            query.get("appid").map(String::as_str),
            query.get("secret").map(String::as_str),
        )
        .and_then(|appid| {
            let issued = state.tokens.plain(
                &appid,
                now,
                secs(config.token_ttl_secs),
                secs(config.token_grace_secs),
            );
            issued.map(|issued| (appid, issued))
        })
    };
    match result {
        Ok((appid, issued)) => {
            tracing::info!(
                appid,
                token_suffix = crate::log::token_suffix(&issued.token),
                "issued access token"
            );
            issued_response(issued)
        }
        Err(err) => {
            tracing::info!(%err, "token request refused");
            err.respond(sandbox.clock())
        }
    }
}

#[derive(Deserialize)]
struct StableTokenRequest {
    grant_type: Option<String>,
    appid: Option<String>,
    secret: Option<String>,
    #[serde(default)]
    force_refresh: bool,
}

/// `POST /cgi-bin/stable_token` with `{"grant_type","appid","secret","force_refresh"}`.
pub(crate) async fn stable_token(State(sandbox): State<Sandbox>, body: Bytes) -> Response {
    let parsed = serde_json::from_slice::<StableTokenRequest>(&body);
    if let Ok(request) = &parsed {
        sandbox
            .lock()
            .tokens
            .count_call(request.appid.as_deref(), |calls| {
                calls.stable += 1;
                calls.stable_forced += u64::from(request.force_refresh);
            });
    }
    if let Some(err) = sandbox.take_injected(paths::STABLE_TOKEN) {
        return err.respond(sandbox.clock());
    }
    let Ok(request) = parsed else {
        return WxError::new(DATA_FORMAT_ERROR).respond(sandbox.clock());
    };
    let now = sandbox.clock().now();
    let ttl = secs(sandbox.inner.config.token_ttl_secs);
    let reissue_window = secs(sandbox.inner.config.stable_reissue_window_secs);
    let result = {
        let mut state = sandbox.lock();
        authenticate(
            &state.apps,
            request.grant_type.as_deref(),
            request.appid.as_deref(),
            request.secret.as_deref(),
        )
        .and_then(|appid| {
            let issued =
                state
                    .tokens
                    .stable(&appid, now, ttl, reissue_window, request.force_refresh);
            issued.map(|issued| (appid, issued))
        })
    };
    match result {
        Ok((appid, issued)) => {
            tracing::info!(
                appid,
                force_refresh = request.force_refresh,
                token_suffix = crate::log::token_suffix(&issued.token),
                "stable access token"
            );
            issued_response(issued)
        }
        Err(err) => {
            tracing::info!(%err, "stable_token request refused");
            err.respond(sandbox.clock())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap_or_default()
    }

    const WINDOW: TimeDelta = TimeDelta::seconds(300);

    #[test]
    fn stable_token_renews_in_its_last_five_minutes() {
        let mut store = TokenStore::default();
        let ttl = TimeDelta::seconds(7200);
        let first = store
            .stable("wx", t(0), ttl, WINDOW, false)
            .map(|i| i.token);
        let again = store.stable("wx", t(6899), ttl, WINDOW, false);
        assert_eq!(again.as_ref().map(|i| &i.token).ok(), first.as_ref().ok());
        assert_eq!(again.map(|i| i.expires_in).ok(), Some(301));
        let renewed = store
            .stable("wx", t(6901), ttl, WINDOW, false)
            .map(|i| i.token);
        assert_ne!(renewed.as_ref().ok(), first.as_ref().ok());
        // The predecessor still works until its own expiry.
        let first = first.unwrap_or_default();
        assert!(store.check(&first, t(7199)).is_ok());
        assert_eq!(
            store.check(&first, t(7200)).map_err(|e| e.code),
            Err(ACCESS_TOKEN_EXPIRED)
        );
    }

    #[test]
    fn force_refresh_quota() {
        let mut store = TokenStore::default();
        let ttl = TimeDelta::seconds(7200);
        let code = |r: Result<Issued, WxError>| r.map(|_| 0).unwrap_or_else(|e| e.code);
        assert_eq!(code(store.stable("wx", t(0), ttl, WINDOW, true)), 0);
        assert_eq!(
            code(store.stable("wx", t(29), ttl, WINDOW, true)),
            MINUTE_QUOTA
        );
        for i in 1..20 {
            assert_eq!(code(store.stable("wx", t(30 * i), ttl, WINDOW, true)), 0);
        }
        assert_eq!(
            code(store.stable("wx", t(30 * 20), ttl, WINDOW, true)),
            DAILY_QUOTA
        );
        // Normal mode is unaffected by the force quota.
        assert_eq!(code(store.stable("wx", t(30 * 20), ttl, WINDOW, false)), 0);
    }

    #[test]
    fn a_shorter_reissue_window_keeps_the_token_longer() {
        let mut store = TokenStore::default();
        let (ttl, window) = (TimeDelta::seconds(20), TimeDelta::seconds(5));
        let first = store
            .stable("wx", t(0), ttl, window, false)
            .map(|i| i.token);
        let again = store.stable("wx", t(15), ttl, window, false);
        assert_eq!(again.as_ref().map(|i| &i.token).ok(), first.as_ref().ok());
        assert_eq!(again.map(|i| i.expires_in).ok(), Some(5));
        let renewed = store.stable("wx", t(16), ttl, window, false);
        assert_ne!(renewed.as_ref().map(|i| &i.token).ok(), first.as_ref().ok());
        assert_eq!(renewed.map(|i| i.expires_in).ok(), Some(20));
    }

    #[test]
    fn invalidate_and_expire_touch_only_working_tokens_of_the_app() {
        let mut store = TokenStore::default();
        let ttl = TimeDelta::seconds(7200);
        let grace = TimeDelta::seconds(300);
        let token = |r: Result<Issued, WxError>| r.map(|i| i.token).unwrap_or_default();
        let old = token(store.plain("wx", t(0), ttl, grace));
        let current = token(store.plain("wx", t(1), ttl, grace));
        let stable = token(store.stable("wx", t(1), ttl, WINDOW, false));
        let other = token(store.plain("wx-other", t(1), ttl, grace));
        assert_eq!(store.invalidate("wx", t(2)), 3);
        for token in [&old, &current, &stable] {
            assert_eq!(
                store.check(token, t(2)).map_err(|e| e.code),
                Err(INVALID_CREDENTIAL)
            );
        }
        assert!(store.check(&other, t(2)).is_ok());
        assert_eq!(
            store.invalidate("wx", t(3)),
            0,
            "nothing left to invalidate"
        );
        // The next calls issue working tokens again.
        let fresh = token(store.stable("wx", t(3), ttl, WINDOW, false));
        assert_ne!(fresh, stable);
        assert!(store.check(&fresh, t(3)).is_ok());

        assert_eq!(store.expire("wx", t(4)), 4, "revoked tokens expire too");
        assert_eq!(
            store.check(&fresh, t(4)).map_err(|e| e.code),
            Err(ACCESS_TOKEN_EXPIRED)
        );
        assert!(store.check(&other, t(4)).is_ok());
        let renewed = token(store.stable("wx", t(4), ttl, WINDOW, false));
        assert_ne!(renewed, fresh);
        assert!(store.check(&renewed, t(4)).is_ok());
    }
}
