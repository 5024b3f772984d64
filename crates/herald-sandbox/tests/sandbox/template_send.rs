use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn success_returns_a_msgid_beyond_2_pow_53_as_a_json_number() {
    let sb = start(config()).await;
    let token = sb.token().await;
    let raw = sb
        .http
        .post(sb.url("/cgi-bin/message/template/send"))
        .query(&[("access_token", token.as_str())])
        .json(&message(OPENID))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    let answer: serde_json::Value = serde_json::from_str(&raw).expect("json");
    assert_eq!(answer["errcode"], 0);
    assert_eq!(answer["errmsg"], "ok");
    let msgid = answer["msgid"]
        .as_u64()
        .expect("msgid is an integer number");
    assert!(msgid > 1 << 53, "{msgid}");
    assert!(raw.contains(&format!("\"msgid\":{msgid}")), "{raw}");
    let next = sb.send(&token, &message(OPENID)).await["msgid"]
        .as_u64()
        .expect("msgid");
    assert_ne!(next, msgid);
}

#[tokio::test]
async fn validation_errors_in_wechat_order() {
    let sb = start(config()).await;
    let token = sb.token().await;

    let mut bad_openid = message(OPENID);
    bad_openid["touser"] = json!("not an openid!");
    let answer = sb.send(&token, &bad_openid).await;
    assert_eq!(errcode(&answer), 40003);
    assert!(
        answer["errmsg"]
            .as_str()
            .expect("errmsg")
            .starts_with("invalid openid rid: ")
    );

    let mut unknown_template = message(OPENID);
    unknown_template["template_id"] = json!("tmpl_nope");
    assert_eq!(errcode(&sb.send(&token, &unknown_template).await), 40037);

    let mut undeclared = message(OPENID);
    undeclared["data"]["coupon"] = json!({"value": "10% off"});
    let answer = sb.send(&token, &undeclared).await;
    assert_eq!(errcode(&answer), 47003);
    let errmsg = answer["errmsg"].as_str().expect("errmsg");
    assert!(
        errmsg.starts_with("argument invalid! data.coupon.value invalid rid: "),
        "{errmsg}"
    );

    let mut no_value = message(OPENID);
    no_value["data"]["eta"] = json!({"color": "#000000"});
    assert_eq!(errcode(&sb.send(&token, &no_value).await), 47003);

    let not_json: serde_json::Value = sb
        .http
        .post(sb.url("/cgi-bin/message/template/send"))
        .query(&[("access_token", token.as_str())])
        .body("touser=x")
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(errcode(&not_json), 47001);
}

#[tokio::test]
async fn token_errors() {
    let sb = start(config()).await;
    let missing: serde_json::Value = sb
        .http
        .post(sb.url("/cgi-bin/message/template/send"))
        .json(&message(OPENID))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(errcode(&missing), 41001);
    assert_eq!(
        errcode(
            &sb.send("90_not_a_real_token_at_all", &message(OPENID))
                .await
        ),
        40001
    );
    // A bad token is reported before a bad body.
    assert_eq!(
        errcode(&sb.send("90_not_a_real_token_at_all", &json!({})).await),
        40001
    );
}

#[tokio::test]
async fn injected_errors_come_in_order_then_normal_behaviour_resumes() {
    let sb = start(config()).await;
    let token = sb.token().await;
    sb.sandbox
        .inject_errors("/cgi-bin/message/template/send", vec![45011, -1, 45009]);

    // Token presence is still checked first, and does not consume an injected error.
    let missing: serde_json::Value = sb
        .http
        .post(sb.url("/cgi-bin/message/template/send"))
        .json(&message(OPENID))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(errcode(&missing), 41001);

    let first = sb.send(&token, &message(OPENID)).await;
    assert_eq!(errcode(&first), 45011);
    assert!(
        first["errmsg"]
            .as_str()
            .expect("errmsg")
            .starts_with("api minute-quota reach limit mustslower retry next minute rid: ")
    );
    // Injected errors come before every other check, even the token's.
    let second = sb
        .send("90_unknown_token_xxxxxxxxxx", &message(OPENID))
        .await;
    assert_eq!(errcode(&second), -1);
    assert!(
        second["errmsg"]
            .as_str()
            .expect("errmsg")
            .starts_with("system error rid: ")
    );
    let third = sb.send(&token, &message(OPENID)).await;
    assert_eq!(errcode(&third), 45009);
    assert!(
        third["errmsg"]
            .as_str()
            .expect("errmsg")
            .starts_with("reach max api daily quota limit rid: ")
    );
    assert_eq!(errcode(&sb.send(&token, &message(OPENID)).await), 0);
}

#[tokio::test]
async fn injected_errors_on_the_token_endpoint() {
    let sb = start(config()).await;
    sb.sandbox.inject_errors("/cgi-bin/token", vec![-1]);
    assert_eq!(errcode(&sb.get_token(APPID, SECRET).await), -1);
    assert!(sb.get_token(APPID, SECRET).await["access_token"].is_string());
}

#[tokio::test]
async fn client_msg_id_duplicate_answers_the_original_msgid() {
    let sb = start(config()).await;
    let token = sb.token().await;
    let mut body = message(OPENID);
    body["client_msg_id"] = json!("herald-42");
    let first = sb.send(&token, &body).await["msgid"]
        .as_u64()
        .expect("msgid");
    let again = sb.send(&token, &body).await;
    assert_eq!(again["errcode"], 0);
    assert_eq!(again["msgid"].as_u64(), Some(first));

    // Another recipient with the same client_msg_id is a different message.
    let mut other = body.clone();
    other["touser"] = json!("oTEST0000000000000000000002");
    assert_ne!(sb.send(&token, &other).await["msgid"].as_u64(), Some(first));

    // Past the 10-minute window it is sent again.
    sb.sandbox
        .advance_clock(std::time::Duration::from_secs(601));
    let token = sb.token().await;
    assert_ne!(sb.send(&token, &body).await["msgid"].as_u64(), Some(first));
}
