//! Templates end to end: YAML definitions through the ingress API, strict rendering, the
//! published pointer and the renderers' cache, `heraldctl templates apply`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use herald_contract::v1::DeliveryState;
use herald_e2e::{TestEnv, demo, openid};
use heraldctl::templates::{self, Outcome};
use serde_json::{Value, json};

/// A stack whose sandbox WeChat app also has the `notice` template of these tests.
async fn start() -> TestEnv {
    TestEnv::start_with(|config| {
        for app in &mut config.sandbox.apps {
            app.templates.push(herald_sandbox::SandboxTemplate {
                template_id: "tmpl_notice".into(),
                keys: vec!["status".into(), "order".into()],
            });
        }
    })
    .await
}

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/templates")
}

/// `method path` on the ingress with the demo key; the status and the JSON answer.
async fn call(env: &TestEnv, method: &str, path: &str, body: Option<String>) -> (u16, Value) {
    let url = format!("{}{path}", env.stack.ingress_url);
    let mut request = match method {
        "GET" => env.http.get(url),
        _ => env.http.post(url),
    }
    .bearer_auth(demo::API_KEY);
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.expect("ingress answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn create(env: &TestEnv, yaml: &str) -> (u16, Value) {
    call(env, "POST", "/v1/templates", Some(yaml.to_string())).await
}

async fn publish(env: &TestEnv, id: &str, version: i64) {
    let (status, body) = call(
        env,
        "POST",
        &format!("/v1/templates/{id}/publish"),
        Some(json!({ "version": version }).to_string()),
    )
    .await;
    assert_eq!(status, 200, "publish {id} v{version}: {body}");
}

/// POSTs a message for `template` (pinned to `version` unless 0) to `to`; its id.
async fn send(env: &TestEnv, template: &str, version: u32, variables: Value, to: &str) -> String {
    send_in(env, template, version, "", variables, to).await
}

async fn send_in(
    env: &TestEnv,
    template: &str,
    version: u32,
    locale: &str,
    variables: Value,
    to: &str,
) -> String {
    let request = json!({
        "template": {"id": template, "version": version, "locale": locale},
        "variables": variables,
        "recipients": [{"wechatOpenid": to}],
        "channels": ["wechat.template"],
    });
    let response = env.post_message(&request.to_string(), &[]).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.expect("JSON");
    body["id"].as_str().expect("id").to_string()
}

/// The body WeChat received for `message_id`, sent to `to` (a recipient of its own).
async fn sent_body(env: &mut TestEnv, message_id: &str, to: &str) -> Value {
    env.wait_for_status(message_id, DeliveryState::Sent).await;
    let sends = env.sends_to(to);
    assert_eq!(sends.len(), 1, "one send to {to}");
    sends[0].body.clone()
}

const NOTICE_V1: &str = r##"
id: notice
category: order
variables:
  order_id: {type: string, required: true, example: A-1}
  code: {type: string, required: true, example: X}
channels:
  wechat.template:
    template_ids: {demo-oa: tmpl_notice}
    url: "https://shop.example.com/o/{{ order_id }}?c={{ code }}"
    miniprogram: {appid: wxminiapp00000001, pagepath: "pages/o?id={{ order_id }}"}
    data:
      status: {value: "v1 {{ code }}", color: "#173177"}
      order: {value: "{{ order_id }}"}
locales:
  zh:
    wechat.template:
      template_ids: {demo-oa: tmpl_notice}
      data:
        status: {value: "已发货 {{ code }}"}
        order: {value: "{{ order_id }}"}
"##;

#[tokio::test]
async fn a_yaml_template_is_sent_exactly_as_rendered() {
    let mut env = start().await;
    let (status, created) = create(&env, NOTICE_V1).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["version"], 1);
    publish(&env, "notice", 1).await;

    let to = openid(1);
    let id = send(
        &env,
        "notice",
        0,
        json!({"order_id": "<A&1>", "code": "Z9"}),
        &to,
    )
    .await;
    let body = sent_body(&mut env, &id, &to).await;
    let client_msg_id = body["client_msg_id"].clone();
    assert_eq!(client_msg_id.as_str().map(str::len), Some(32));
    assert_eq!(
        body,
        json!({
            "touser": to,
            "template_id": "tmpl_notice",
            "url": "https://shop.example.com/o/<A&1>?c=Z9",
            "miniprogram": {"appid": "wxminiapp00000001", "pagepath": "pages/o?id=<A&1>"},
            "data": {
                "status": {"value": "v1 Z9", "color": "#173177"},
                "order": {"value": "<A&1>"}
            },
            "client_msg_id": client_msg_id,
        })
    );

    // A locale picks its variant (zh_CN falls back to zh).
    let to = openid(3);
    let id = send_in(
        &env,
        "notice",
        0,
        "zh_CN",
        json!({"order_id": "A-2", "code": "Z9"}),
        &to,
    )
    .await;
    let body = sent_body(&mut env, &id, &to).await;
    assert_eq!(
        body["data"],
        json!({"status": {"value": "已发货 Z9"}, "order": {"value": "A-2"}})
    );
    assert!(body.get("url").is_none(), "the zh variant has no url");
    env.stop().await;
}

#[tokio::test]
async fn a_missing_variable_rejects_the_message_and_sends_nothing() {
    let env = TestEnv::start().await;
    let to = openid(2);
    // The demo template requires `eta`.
    let id = send(
        &env,
        demo::TEMPLATE,
        0,
        json!({"order_id": "A-1", "carrier": "SF"}),
        &to,
    )
    .await;
    let dead = env.next_dead_letter().await;
    let detail = herald_amqp::header_str(
        dead.properties.headers().as_ref(),
        herald_contract::headers::DEAD_DETAIL,
    )
    .unwrap_or_default()
    .to_string();
    assert_eq!(detail, "variables.eta: required by the template");
    let view = env.get_message(&id).await;
    assert_eq!(view["state"], "rejected");
    assert_eq!(view["error"], "variables.eta: required by the template");
    assert_eq!(view["deliveries"], json!([]));
    assert!(env.sends_to(&to).is_empty(), "nothing sent");
    env.stop().await;
}

#[tokio::test]
async fn publishing_v2_reaches_a_renderer_that_cached_v1_within_a_second() {
    let mut env = start().await;
    assert_eq!(create(&env, NOTICE_V1).await.0, 201);
    publish(&env, "notice", 1).await;
    let vars = json!({"order_id": "A-1", "code": "C"});

    // v1 is rendered, and so cached.
    let to = openid(10);
    let id = send(&env, "notice", 0, vars.clone(), &to).await;
    assert_eq!(
        sent_body(&mut env, &id, &to).await["data"]["status"]["value"],
        "v1 C"
    );

    let (status, created) = create(&env, &NOTICE_V1.replace("v1 {{", "v2 {{")).await;
    assert_eq!((status, &created["version"]), (201, &json!(2)), "{created}");
    // Created, not published: still v1.
    let to = openid(11);
    let id = send(&env, "notice", 0, vars.clone(), &to).await;
    assert_eq!(
        sent_body(&mut env, &id, &to).await["data"]["status"]["value"],
        "v1 C"
    );

    publish(&env, "notice", 2).await;
    let published = Instant::now();
    let mut n = 12;
    loop {
        let submitted = published.elapsed();
        let to = openid(n);
        let id = send(&env, "notice", 0, vars.clone(), &to).await;
        let value = sent_body(&mut env, &id, &to).await["data"]["status"]["value"].clone();
        if value == "v2 C" {
            break;
        }
        assert!(
            submitted < Duration::from_secs(1),
            "a request sent {submitted:?} after publishing v2 still rendered {value}"
        );
        n += 1;
    }

    // A pinned version renders that version, whatever is published.
    let to = openid(100);
    let id = send(&env, "notice", 1, vars.clone(), &to).await;
    assert_eq!(
        sent_body(&mut env, &id, &to).await["data"]["status"]["value"],
        "v1 C"
    );
    let to = openid(101);
    let id = send(&env, "notice", 3, vars.clone(), &to).await;
    env.next_dead_letter().await;
    let view = env.get_message(&id).await;
    assert_eq!(
        view["error"],
        "template.id: unknown template `notice` version 3"
    );
    env.stop().await;
}

#[tokio::test]
async fn the_template_api_validates_lists_publishes_and_previews() {
    let env = TestEnv::start().await;
    let base = "id: bad\nvariables:\n  name: {type: string, required: true}\nchannels:\n";
    let invalid = [
        (
            "  wecom: {msgtype: text, content: \"{{ name }} {{ nobody }}\"}\n",
            "channels.wecom.content",
            "`nobody`",
        ),
        (
            "  wechat.subscribe:\n    template_ids: {demo-oa: t}\n    data:\n      thing1: {value: \"twenty-one characters\"}\n",
            "channels.wechat.subscribe.data.thing1.value",
            "at most 20",
        ),
        (
            "  sms2: {text: hi}\n",
            "channels.sms2",
            "unknown field `sms2`",
        ),
    ];
    for (variant, field, needle) in invalid {
        let (status, body) = create(&env, &format!("{base}{variant}")).await;
        assert_eq!(status, 400, "{variant}: {body}");
        assert_eq!(body["field"], field, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(needle)),
            "{body}"
        );
    }
    let (status, _) = call(&env, "GET", "/v1/templates/bad", None).await;
    assert_eq!(status, 404, "nothing stored for an invalid template");
    let unauthenticated = env
        .http
        .get(format!("{}/v1/templates", env.stack.ingress_url))
        .send()
        .await
        .expect("answers");
    assert_eq!(unauthenticated.status(), 401);

    let login_alert =
        std::fs::read_to_string(examples_dir().join("login_alert.yaml")).expect("example");
    let (status, created) = create(&env, &login_alert).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created,
        json!({"id": "login_alert", "version": 1, "created": true, "published_version": null})
    );
    let (status, again) = create(&env, &login_alert).await;
    assert_eq!(status, 200);
    assert_eq!(again["created"], false);
    let (status, _) = call(&env, "POST", "/v1/templates/login_alert/preview", None).await;
    assert_eq!(status, 404, "nothing published yet");
    let (status, body) = call(
        &env,
        "POST",
        "/v1/templates/login_alert/publish",
        Some("{}".into()),
    )
    .await;
    assert_eq!((status, &body["field"]), (400, &json!("version")));
    let (status, _) = call(
        &env,
        "POST",
        "/v1/templates/login_alert/publish",
        Some(r#"{"version": 9}"#.into()),
    )
    .await;
    assert_eq!(status, 404);
    publish(&env, "login_alert", 1).await;

    let (_, list) = call(&env, "GET", "/v1/templates", None).await;
    let listed = |id: &str| {
        list["templates"]
            .as_array()
            .and_then(|all| all.iter().find(|t| t["id"] == id))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(listed("login_alert")["category"], "security");
    assert_eq!(listed("login_alert")["published_version"], 1);
    assert_eq!(listed(demo::TEMPLATE)["latest_version"], 1);
    let (_, one) = call(&env, "GET", "/v1/templates/login_alert", None).await;
    assert_eq!(one["published_version"], 1);
    assert_eq!(one["versions"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["versions"][0]["definition"]["id"], "login_alert");

    // Preview: every channel of the demo template, from its examples and the given values.
    let (status, preview) = call(
        &env,
        "POST",
        "/v1/templates/order_shipped/preview",
        Some(json!({"variables": {"order_id": "<B-2>"}}).to_string()),
    )
    .await;
    assert_eq!(status, 200, "{preview}");
    let channels = preview["channels"].as_object().expect("channels");
    let mut names: Vec<&str> = channels.keys().map(String::as_str).collect();
    names.sort();
    let mut all = herald_renderer::template::TEMPLATE_CHANNELS.to_vec();
    all.sort();
    assert_eq!(names, all);
    for (channel, rendered) in channels {
        assert!(rendered["payload"].is_object(), "{channel}: {rendered}");
    }
    assert_eq!(
        channels["wechat.template"]["payload"]["template_id"],
        "tmpl_order_shipped"
    );
    assert_eq!(
        channels["wechat.template"]["payload"]["data"]["order_id"]["value"],
        "<B-2>"
    );
    assert!(
        channels["email"]["payload"]["html"]
            .as_str()
            .is_some_and(|h| h.contains("<b>&lt;B-2&gt;</b>"))
    );
    assert_eq!(channels["sms"]["payload"]["template_id"], "SMS_300001");
    assert_eq!(
        channels["webhook"]["payload"]["order"]["carrier"],
        "SF Express"
    );
    let (_, zh) = call(
        &env,
        "POST",
        "/v1/templates/order_shipped/preview",
        Some(json!({"locale": "zh_CN"}).to_string()),
    )
    .await;
    assert_eq!(zh["channels"]["wecom"]["payload"]["msgtype"], "text");
    // A value over a channel's limit shows as that channel's error.
    let (_, long) = call(
        &env,
        "POST",
        "/v1/templates/order_shipped/preview",
        Some(json!({"variables": {"carrier": "x".repeat(30)}}).to_string()),
    )
    .await;
    assert_eq!(
        long["channels"]["wechat.subscribe"]["error"]["field"],
        "channels.wechat.subscribe.data.thing2.value"
    );
    assert!(long["channels"]["wechat.template"]["payload"].is_object());
    env.stop().await;
}

#[tokio::test]
async fn heraldctl_templates_apply_twice_creates_nothing_the_second_time() {
    let env = TestEnv::start().await;
    let db = env.db().await;
    let versions = || async {
        db.query_one("SELECT count(*) FROM template_versions", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
    };
    let before = versions().await;
    // A dry run says what would change, and changes nothing.
    let planned = templates::apply(
        &env.http,
        &env.stack.ingress_url,
        demo::API_KEY,
        &examples_dir(),
        true,
    )
    .await
    .expect("dry run");
    for applied in &planned {
        let expected = if applied.id == demo::TEMPLATE {
            Outcome::Unchanged { version: 1 }
        } else {
            Outcome::WouldCreate
        };
        assert_eq!(applied.outcome, expected, "{}", applied.path.display());
    }
    assert_eq!(versions().await, before, "a dry run stores nothing");
    let first = templates::apply(
        &env.http,
        &env.stack.ingress_url,
        demo::API_KEY,
        &examples_dir(),
        false,
    )
    .await
    .expect("first apply");
    // Every example is new but the demo template, seeded from the same file by `heraldctl up`.
    for applied in &first {
        let expected = if applied.id == demo::TEMPLATE {
            Outcome::Unchanged { version: 1 }
        } else {
            Outcome::Published {
                version: 1,
                created: true,
            }
        };
        assert_eq!(applied.outcome, expected, "{}", applied.path.display());
    }
    assert!(first.iter().any(|a| a.id == "login_alert"));
    let created = i64::try_from(first.len()).expect("few files") - 1;
    assert_eq!(versions().await, before + created);

    let second = templates::apply(
        &env.http,
        &env.stack.ingress_url,
        demo::API_KEY,
        &examples_dir(),
        false,
    )
    .await
    .expect("second apply");
    assert!(
        second
            .iter()
            .all(|a| matches!(a.outcome, Outcome::Unchanged { .. })),
        "{second:?}"
    );
    assert_eq!(
        versions().await,
        before + created,
        "the second apply stored nothing"
    );

    // A broken file changes nothing, and says which file and field.
    let dir = std::env::temp_dir().join(format!("herald-templates-{}", env.id));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("a.yaml"),
        "id: a\nchannels: {feishu: {msg_type: text, text: hi}}\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("b.yaml"),
        "id: b\nchannels: {feishu: {msg_type: txt, text: hi}}\n",
    )
    .expect("write");
    let err = templates::apply(
        &env.http,
        &env.stack.ingress_url,
        demo::API_KEY,
        &dir,
        false,
    )
    .await
    .expect_err("b.yaml is invalid");
    let message = err.to_string();
    assert!(
        message.contains("b.yaml") && message.contains("channels.feishu.msg_type"),
        "{message}"
    );
    assert_eq!(
        versions().await,
        before + created,
        "a.yaml was not applied either"
    );
    let _ = std::fs::remove_dir_all(&dir);
    env.stop().await;
}
