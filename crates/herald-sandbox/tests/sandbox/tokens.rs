use std::time::Duration;

use herald_sandbox::{SandboxConfig, TokenCalls};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn each_token_call_issues_a_new_token_and_the_previous_one_stays_valid() {
    let sb = start(config()).await;
    let first = sb.get_token(APPID, SECRET).await;
    assert_eq!(first["expires_in"], 7200);
    let first = first["access_token"].as_str().expect("token").to_owned();
    let second = sb.token().await;
    assert_ne!(first, second);
    // Within the 5-minute grace both work.
    assert_eq!(errcode(&sb.send(&first, &message(OPENID)).await), 0);
    assert_eq!(errcode(&sb.send(&second, &message(OPENID)).await), 0);
}

#[tokio::test]
async fn a_token_two_generations_old_is_rejected_once_its_grace_is_over() {
    let sb = start(SandboxConfig {
        token_grace_secs: 0,
        ..config()
    })
    .await;
    let first = sb.token().await;
    let second = sb.token().await;
    let third = sb.token().await;
    let answer = sb.send(&first, &message(OPENID)).await;
    assert_eq!(errcode(&answer), 40001);
    let errmsg = answer["errmsg"].as_str().expect("errmsg");
    assert!(
        errmsg.starts_with("invalid credential, access_token is invalid or not latest rid: "),
        "{errmsg}"
    );
    // With no grace the superseded token dies at once too; the latest works.
    assert_eq!(errcode(&sb.send(&second, &message(OPENID)).await), 40001);
    assert_eq!(errcode(&sb.send(&third, &message(OPENID)).await), 0);
}

#[tokio::test]
async fn grace_runs_from_when_the_token_is_superseded() {
    let sb = start(config()).await;
    let first = sb.token().await;
    let second = sb.token().await;
    sb.sandbox.advance_clock(Duration::from_secs(301));
    let third = sb.token().await;
    assert_eq!(errcode(&sb.send(&first, &message(OPENID)).await), 40001);
    assert_eq!(errcode(&sb.send(&second, &message(OPENID)).await), 0);
    assert_eq!(errcode(&sb.send(&third, &message(OPENID)).await), 0);
}

#[tokio::test]
async fn expired_token_answers_42001() {
    let sb = start(config()).await;
    let token = sb.token().await;
    sb.sandbox.advance_clock(Duration::from_secs(7200));
    let answer = sb.send(&token, &message(OPENID)).await;
    assert_eq!(errcode(&answer), 42001);
    assert!(
        answer["errmsg"]
            .as_str()
            .expect("errmsg")
            .starts_with("access_token expired rid: ")
    );
}

#[tokio::test]
async fn credential_errors() {
    let sb = start(config()).await;
    assert_eq!(errcode(&sb.get_token(APPID, "wrong").await), 40125);
    assert_eq!(
        errcode(&sb.get_token("wxunknown000000001", SECRET).await),
        40013
    );
    let bad_grant: serde_json::Value = sb
        .http
        .get(sb.url("/cgi-bin/token"))
        .query(&[
            ("grant_type", "password"),
            ("appid", APPID),
            ("secret", SECRET),
        ])
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(errcode(&bad_grant), 40002);
}

#[tokio::test]
async fn stable_token_is_stable_until_forced() {
    let sb = start(config()).await;
    let first = sb.stable_token(false).await;
    let token = first["access_token"].as_str().expect("token").to_owned();
    let expires_in = first["expires_in"].as_i64().expect("expires_in");
    assert!((300..=7200).contains(&expires_in), "{expires_in}");
    let again = sb.stable_token(false).await;
    assert_eq!(again["access_token"], token.as_str());

    // Independent of /cgi-bin/token: issuing plain tokens does not touch it.
    let _ = sb.token().await;
    assert_eq!(errcode(&sb.send(&token, &message(OPENID)).await), 0);

    let forced = sb.stable_token(true).await;
    let new_token = forced["access_token"].as_str().expect("token").to_owned();
    assert_ne!(new_token, token);
    assert_eq!(errcode(&sb.send(&token, &message(OPENID)).await), 40001);
    assert_eq!(errcode(&sb.send(&new_token, &message(OPENID)).await), 0);
    assert_eq!(
        sb.stable_token(false).await["access_token"],
        new_token.as_str()
    );

    // A second force within 30 s is refused; after 30 s it is allowed again.
    let refused = sb.stable_token(true).await;
    assert_eq!(errcode(&refused), 45011);
    assert!(
        refused["errmsg"]
            .as_str()
            .expect("errmsg")
            .starts_with("api minute-quota reach limit mustslower retry next minute rid: ")
    );
    sb.sandbox.advance_clock(Duration::from_secs(31));
    assert!(sb.stable_token(true).await["access_token"].is_string());
}

#[tokio::test]
async fn stable_token_renews_in_the_last_five_minutes() {
    let sb = start(config()).await;
    let first = sb.stable_token(false).await["access_token"].clone();
    sb.sandbox.advance_clock(Duration::from_secs(7200 - 299));
    let renewed = sb.stable_token(false).await;
    assert_ne!(renewed["access_token"], first);
    assert_eq!(renewed["expires_in"], 7200);
    // The old one still works until its own expiry.
    let first = first.as_str().expect("token");
    assert_eq!(errcode(&sb.send(first, &message(OPENID)).await), 0);
}

#[tokio::test]
async fn stable_token_errors() {
    let sb = start(config()).await;
    let wrong_secret = sb
        .stable(json!({"grant_type": "client_credential", "appid": APPID, "secret": "nope"}))
        .await;
    assert_eq!(errcode(&wrong_secret), 40125);
    let unknown = sb
        .stable(json!({"grant_type": "client_credential", "appid": "wxnope", "secret": SECRET}))
        .await;
    assert_eq!(errcode(&unknown), 40013);
    let bad_json: serde_json::Value = sb
        .http
        .post(sb.url("/cgi-bin/stable_token"))
        .body("{not json")
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(errcode(&bad_json), 47001);
}

#[tokio::test]
async fn invalidated_tokens_answer_40001_and_the_next_call_issues_a_working_one() {
    let sb = start(config()).await;
    let classic = sb.token().await;
    let stable = sb.stable_token(false).await["access_token"]
        .as_str()
        .expect("stable token")
        .to_owned();
    assert_eq!(sb.sandbox.invalidate_tokens(APPID), 2);
    for token in [&classic, &stable] {
        let answer = sb.send(token, &message(OPENID)).await;
        assert_eq!(errcode(&answer), 40001, "{answer}");
    }
    // A normal stable_token call no longer answers the revoked token.
    let renewed = sb.stable_token(false).await;
    let renewed = renewed["access_token"].as_str().expect("token");
    assert_ne!(renewed, stable);
    assert_eq!(errcode(&sb.send(renewed, &message(OPENID)).await), 0);
    let plain = sb.token().await;
    assert_eq!(errcode(&sb.send(&plain, &message(OPENID)).await), 0);
    // Other apps are untouched; an unknown appid touches nothing.
    assert_eq!(sb.sandbox.invalidate_tokens("wxunknown000000001"), 0);
}

#[tokio::test]
async fn expired_tokens_answer_42001_and_the_next_call_issues_a_working_one() {
    let sb = start(config()).await;
    let stable = sb.stable_token(false).await["access_token"]
        .as_str()
        .expect("stable token")
        .to_owned();
    assert_eq!(sb.sandbox.expire_tokens(APPID), 1);
    let answer = sb.send(&stable, &message(OPENID)).await;
    assert_eq!(errcode(&answer), 42001, "{answer}");
    let renewed = sb.stable_token(false).await;
    assert_eq!(renewed["expires_in"], 7200);
    let renewed = renewed["access_token"].as_str().expect("token");
    assert_ne!(renewed, stable);
    assert_eq!(errcode(&sb.send(renewed, &message(OPENID)).await), 0);
}

#[tokio::test]
async fn token_calls_are_counted_per_appid_refused_ones_included() {
    let sb = start(config()).await;
    assert_eq!(sb.sandbox.token_calls(APPID), TokenCalls::default());
    let _ = sb.token().await;
    assert_eq!(errcode(&sb.get_token(APPID, "wrong").await), 40125);
    let _ = sb.stable_token(false).await;
    let _ = sb.stable_token(true).await;
    // Within 30 s of the last force: refused, still counted.
    assert_eq!(errcode(&sb.stable_token(true).await), 45011);
    sb.sandbox.inject_errors("/cgi-bin/stable_token", vec![-1]);
    assert_eq!(errcode(&sb.stable_token(false).await), -1);
    let _ = sb.get_token("wxother00000000001", SECRET).await;
    assert_eq!(
        sb.sandbox.token_calls(APPID),
        TokenCalls {
            classic: 2,
            stable: 4,
            stable_forced: 2,
        }
    );
    assert_eq!(
        sb.sandbox.token_calls("wxother00000000001"),
        TokenCalls {
            classic: 1,
            ..TokenCalls::default()
        }
    );
}

#[tokio::test]
async fn token_controls_over_http() {
    let sb = start(config()).await;
    let token = sb.token().await;
    let _ = sb.stable_token(true).await;
    let calls: TokenCalls = sb
        .http
        .get(sb.url("/_sandbox/tokens/calls"))
        .query(&[("appid", APPID)])
        .send()
        .await
        .expect("calls")
        .json()
        .await
        .expect("calls json");
    assert_eq!(
        calls,
        TokenCalls {
            classic: 1,
            stable: 1,
            stable_forced: 1,
        }
    );
    let invalidated: serde_json::Value = sb
        .http
        .post(sb.url("/_sandbox/tokens/invalidate"))
        .json(&json!({"appid": APPID}))
        .send()
        .await
        .expect("invalidate")
        .json()
        .await
        .expect("json");
    assert_eq!(invalidated["invalidated"], 2);
    assert_eq!(errcode(&sb.send(&token, &message(OPENID)).await), 40001);

    let fresh = sb.token().await;
    let expired: serde_json::Value = sb
        .http
        .post(sb.url("/_sandbox/tokens/expire"))
        .json(&json!({"appid": APPID}))
        .send()
        .await
        .expect("expire")
        .json()
        .await
        .expect("json");
    assert!(expired["expired"].as_u64().expect("count") >= 1);
    assert_eq!(errcode(&sb.send(&fresh, &message(OPENID)).await), 42001);

    let missing = sb
        .http
        .get(sb.url("/_sandbox/tokens/calls"))
        .send()
        .await
        .expect("calls without appid");
    assert_eq!(missing.status().as_u16(), 400);
    // Control calls are not in the request log.
    assert!(
        sb.sandbox
            .requests()
            .iter()
            .all(|r| !r.path.starts_with("/_sandbox"))
    );
}

#[tokio::test]
async fn the_stable_reissue_window_is_configurable() {
    let sb = start(SandboxConfig {
        token_ttl_secs: 3600,
        stable_reissue_window_secs: 60,
        ..config()
    })
    .await;
    let first = sb.stable_token(false).await;
    let token = first["access_token"].clone();
    sb.sandbox.advance_clock(Duration::from_secs(3600 - 61));
    let same = sb.stable_token(false).await;
    assert_eq!(same["access_token"], token);
    assert!(same["expires_in"].as_i64().expect("expires_in") >= 60);
    sb.sandbox.advance_clock(Duration::from_secs(2));
    let renewed = sb.stable_token(false).await;
    assert_ne!(renewed["access_token"], token);
    assert_eq!(renewed["expires_in"], 3600);
}
