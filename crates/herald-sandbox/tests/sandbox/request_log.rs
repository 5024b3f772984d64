use std::time::Duration;

use serde_json::json;

use crate::common::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn trace_headers_are_recorded_and_secrets_redacted() {
    let sb = start(config()).await;
    let token = sb.token().await;
    let suffix = &token[token.len() - 6..];
    let answer: serde_json::Value = sb
        .http
        .post(sb.url("/cgi-bin/message/template/send"))
        .query(&[("access_token", token.as_str())])
        .header("traceparent", TRACEPARENT)
        .header("tracestate", "herald=1")
        .json(&message(OPENID))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    sb.stable(json!({"grant_type": "client_credential", "appid": APPID, "secret": SECRET}))
        .await;

    let log = sb.sandbox.requests();
    assert_eq!(log.len(), 3);
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq));

    let token_call = &log[0];
    assert_eq!(token_call.method, "GET");
    assert_eq!(token_call.path, "/cgi-bin/token");
    assert_eq!(token_call.query["secret"], "***");
    assert_eq!(token_call.query["appid"], APPID);
    assert_eq!(token_call.response["access_token"], format!("***{suffix}"));

    let send = &log[1];
    assert_eq!(send.path, "/cgi-bin/message/template/send");
    assert_eq!(send.headers["traceparent"], TRACEPARENT);
    assert_eq!(send.headers["tracestate"], "herald=1");
    assert_eq!(send.headers["content-type"], "application/json");
    assert_eq!(send.query["access_token"], format!("***{suffix}"));
    assert_eq!(send.body["touser"], OPENID);
    assert_eq!(send.response, answer);

    let stable = &log[2];
    assert_eq!(stable.body["secret"], "***");
    let logged = serde_json::to_string(&log).expect("json");
    assert!(!logged.contains(SECRET));
    assert!(!logged.contains(&token));
}

#[tokio::test]
async fn wait_for_requests_wakes_on_arrival_and_gives_up_at_timeout() {
    let sb = start(config()).await;
    let waiter = {
        let sandbox = sb.sandbox.clone();
        tokio::spawn(async move {
            sandbox
                .wait_for_requests("/cgi-bin/message/template/send", 2, Duration::from_secs(10))
                .await
        })
    };
    let token = sb.token().await;
    sb.send(&token, &message(OPENID)).await;
    sb.send(&token, &message(OPENID)).await;
    let found = waiter.await.expect("waiter");
    assert_eq!(found.len(), 2);
    assert!(
        found
            .iter()
            .all(|r| r.path == "/cgi-bin/message/template/send")
    );

    let partial = sb
        .sandbox
        .wait_for_requests(
            "/cgi-bin/message/template/send",
            5,
            Duration::from_millis(50),
        )
        .await;
    assert_eq!(partial.len(), 2);

    sb.sandbox.clear_requests();
    assert!(sb.sandbox.requests().is_empty());
}

#[tokio::test]
async fn unknown_paths_are_logged_and_answer_404() {
    let sb = start(config()).await;
    let response = sb
        .http
        .post(sb.url("/cgi-bin/message/custom/send"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 404);
    let log = sb
        .sandbox
        .wait_for_requests("/cgi-bin/message/custom/send", 1, Duration::from_secs(5))
        .await;
    assert_eq!(log.len(), 1);
}
