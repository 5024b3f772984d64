use herald_sandbox::{CallbackAttempt, LoggedRequest, SandboxApp, SandboxTemplate};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn control_routes_drive_the_sandbox_over_http() {
    let sb = start(config()).await;
    let status = sb
        .http
        .post(sb.url("/_sandbox/errors"))
        .json(&json!({"path": "/cgi-bin/message/template/send", "errcodes": [43004]}))
        .send()
        .await
        .expect("inject")
        .status();
    assert!(status.is_success());

    let app = SandboxApp {
        appid: "wxsecond000000002".into(),
        secret: "second-secret".into(),
        original_id: "gh_second0000002".into(),
        callback_url: None,
        callback_token: "t".into(),
        callback_mode: Default::default(),
        encoding_aes_key: None,
        templates: vec![SandboxTemplate {
            template_id: "tmpl_other".into(),
            keys: vec!["name".into()],
        }],
        subscribe_templates: vec![],
    };
    let status = sb
        .http
        .post(sb.url("/_sandbox/apps"))
        .json(&app)
        .send()
        .await
        .expect("add app")
        .status();
    assert!(status.is_success());
    let status = sb
        .http
        .post(sb.url("/_sandbox/callback-status"))
        .json(&json!({"openid": OPENID, "status": "failed: system failed"}))
        .send()
        .await
        .expect("callback status")
        .status();
    assert!(status.is_success());

    let token = sb.get_token("wxsecond000000002", "second-secret").await["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let refused = sb
        .send(&token, &json!({"touser": OPENID, "template_id": "tmpl_other", "data": {"name": {"value": "x"}}}))
        .await;
    assert_eq!(errcode(&refused), 43004);
    assert!(
        refused["errmsg"]
            .as_str()
            .expect("errmsg")
            .starts_with("require subscribe rid: ")
    );
    let sent = sb
        .send(&token, &json!({"touser": OPENID, "template_id": "tmpl_other", "data": {"name": {"value": "x"}}}))
        .await;
    assert_eq!(errcode(&sent), 0);

    // Control calls are not logged; the filter keeps one path.
    let all: Vec<LoggedRequest> = sb
        .http
        .get(sb.url("/_sandbox/requests"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|r| !r.path.starts_with("/_sandbox")));
    let sends: Vec<LoggedRequest> = sb
        .http
        .get(sb.url("/_sandbox/requests"))
        .query(&[("path", "/cgi-bin/message/template/send")])
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(sends.len(), 2);

    let callbacks: Vec<CallbackAttempt> = sb
        .http
        .get(sb.url("/_sandbox/callbacks"))
        .send()
        .await
        .expect("callbacks")
        .json()
        .await
        .expect("json");
    assert!(callbacks.is_empty());

    let status = sb
        .http
        .delete(sb.url("/_sandbox/requests"))
        .send()
        .await
        .expect("clear")
        .status();
    assert!(status.is_success());
    assert!(sb.sandbox.requests().is_empty());
}

#[tokio::test]
async fn default_config_has_the_demo_app() {
    let config = herald_sandbox::SandboxConfig::default();
    assert_eq!(config.listen, "127.0.0.1:8099");
    assert_eq!(config.callback_delay_ms, 200);
    assert_eq!(config.token_ttl_secs, 7200);
    let app = &config.apps[0];
    assert_eq!(app.appid, "wxdemo0000000001");
    assert_eq!(app.templates[0].keys, ["order_id", "carrier", "eta"]);
    let sb = start(herald_sandbox::SandboxConfig {
        listen: "127.0.0.1:0".into(),
        ..config
    })
    .await;
    assert!(sb.get_token(APPID, SECRET).await["access_token"].is_string());
}
