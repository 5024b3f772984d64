//! The `sms` channel through the whole stack against the sandbox's Tencent Cloud SMS and Aliyun
//! SMS twins: the exact wire body of each, its signature (checked by the twin as the provider
//! does, and against each provider's official Python SDK), one answer per error class, delivery
//! receipts folded into `delivered`/`failed`, and receipts without the account's secret refused.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use herald_contract::channels;
use herald_contract::v1::{DeliveryState, NotificationRequest, Recipient};
use herald_e2e::{TestEnv, WAIT, demo};
use herald_sandbox::{SmsProvider, SmsReceipt, SmsRequest};
use heraldctl::demo as seed;
use serde_json::{Value, json};

const PHONE: &str = "+86 138-0013-8000";
const TENCENT_KEY_ID: &str = "AKIDdemo00000000000000000000000000";
const TENCENT_SECRET: &str = "demo-tencent-sms-secret-key-000001";
const ALIYUN_KEY_ID: &str = "LTAIdemo0000000000000001";
const ALIYUN_SECRET: &str = "demo-aliyun-sms-secret-000001";

/// A Tencent template (positional parameters) for the demo Tencent account.
const TENCENT_TEMPLATE: &str = r#"
id: login_code
description: A login code.
variables:
  code: {type: string, required: true}
channels:
  sms:
    template_ids: {demo-sms-tencent: "1000001"}
    params: ["{{ code }}", "5"]
"#;

fn sms_request(template: &str, phone: &str, variables: Value) -> NotificationRequest {
    let mut request = demo::request(demo::OPENID, "SMS");
    request.id = uuid::Uuid::now_v7().to_string();
    request.template = Some(herald_contract::v1::TemplateRef {
        id: template.into(),
        ..Default::default()
    });
    request.variables = serde_json::from_value(variables).ok();
    request.channels = vec![channels::SMS.into()];
    request.recipients = vec![Recipient {
        phone: phone.into(),
        ..Default::default()
    }];
    request
}

fn order_request(order: &str, phone: &str) -> NotificationRequest {
    sms_request(
        demo::TEMPLATE,
        phone,
        json!({"order_id": order, "carrier": "SF Express", "eta": "tomorrow"}),
    )
}

async fn publish(env: &TestEnv, request: &NotificationRequest) {
    env.publish_request(&herald_contract::encode_json(request), Some("guest"), None)
        .await;
}

/// Publishes the Tencent template and makes the Tencent account the tenant's default `sms`
/// account (the seed makes Aliyun's).
async fn use_tencent(env: &TestEnv) {
    let ingress = &env.stack.ingress_url;
    let created = env
        .http
        .post(format!("{ingress}/v1/templates"))
        .bearer_auth(demo::API_KEY)
        .body(TENCENT_TEMPLATE)
        .send()
        .await
        .expect("ingress answers");
    assert!(created.status().is_success(), "create login_code");
    let published = env
        .http
        .post(format!("{ingress}/v1/templates/login_code/publish"))
        .bearer_auth(demo::API_KEY)
        .body(json!({"version": 1}).to_string())
        .send()
        .await
        .expect("ingress answers");
    assert_eq!(published.status(), 200, "publish login_code");
    env.db()
        .await
        .execute(
            "UPDATE provider_accounts SET is_default = (id = $1) WHERE channel = 'sms'",
            &[&seed::SMS_TENCENT_ACCOUNT],
        )
        .await
        .expect("default sms account");
}

/// The message's one delivery once it is in `state` (read from the status API).
async fn delivery_in(env: &TestEnv, id: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let view = env.get_message(id).await;
        let delivery = view["deliveries"][0].clone();
        if delivery["state"] == state {
            return delivery;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {state}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn requests_of(env: &TestEnv, provider: SmsProvider) -> Vec<SmsRequest> {
    env.stack
        .sandbox
        .sms_requests()
        .into_iter()
        .filter(|r| r.provider == provider)
        .collect()
}

fn form(body: &str) -> BTreeMap<String, String> {
    reqwest::Url::parse(&format!("http://x/?{body}"))
        .expect("form body")
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tencent_sends_the_documented_signed_body_and_its_receipt_delivers() {
    let mut env = TestEnv::start().await;
    use_tencent(&env).await;
    let request = sms_request("login_code", PHONE, json!({"code": "123456"}));
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Sent).await;
    env.wait_for_status(&request.id, DeliveryState::Delivered)
        .await;

    let calls = requests_of(&env, SmsProvider::TencentSms);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    // The sandbox checked the TC3 signature as Tencent does before answering Ok.
    assert_eq!(call.code, "Ok");
    let delivery = delivery_in(&env, &request.id, "delivered").await;
    let delivery_id = delivery["id"]
        .as_str()
        .expect("delivery id")
        .replace('-', "");
    let body: Value = serde_json::from_str(&call.body).expect("JSON body");
    assert_eq!(
        body,
        json!({
            "PhoneNumberSet": ["+8613800138000"],
            "SmsSdkAppId": "1400000001",
            "SignName": "Herald演示",
            "TemplateId": "1000001",
            "TemplateParamSet": ["123456", "5"],
            "SessionContext": delivery_id,
        })
    );
    assert_eq!(call.method, "POST");
    assert_eq!(call.headers["x-tc-action"], "SendSms");
    assert_eq!(call.headers["x-tc-version"], "2021-01-11");
    assert_eq!(call.headers["x-tc-region"], "ap-guangzhou");
    assert_eq!(
        call.headers["content-type"],
        "application/json; charset=utf-8"
    );
    // Our signer recomputed over what went over the wire gives the header that was sent.
    let timestamp: i64 = call.headers["x-tc-timestamp"].parse().expect("timestamp");
    assert_eq!(
        call.headers["authorization"],
        herald_sender::channels::sms::tencent::authorization(
            "sms",
            TENCENT_KEY_ID,
            TENCENT_SECRET,
            &call.headers["host"],
            &call.headers["content-type"],
            call.body.as_bytes(),
            timestamp,
        )
    );
    // The SerialNo is the provider message id; the receipt named it and was acknowledged.
    let message = &env.stack.sandbox.sms_messages()[0];
    assert_eq!(delivery["provider_msgid"], message.msgid.as_str());
    let receipts = env.stack.sandbox.wait_for_sms_receipts(1, WAIT).await;
    assert_eq!(receipts[0].status, Some(200));
    assert_eq!(receipts[0].body[0]["sid"], message.msgid.as_str());
    assert_eq!(
        serde_json::from_str::<Value>(receipts[0].response.as_deref().unwrap_or_default())
            .expect("JSON answer"),
        json!({"result": 0, "errmsg": "OK"})
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliyun_sends_the_documented_signed_form_and_its_receipt_delivers() {
    let mut env = TestEnv::start().await;
    let request = order_request("SMS-A1", "13800138000");
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Delivered)
        .await;

    let calls = requests_of(&env, SmsProvider::AliyunSms);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(call.code, "OK");
    assert_eq!(call.method, "POST");
    assert_eq!(
        call.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(call.query, "");
    let delivery = delivery_in(&env, &request.id, "delivered").await;
    let delivery_id = delivery["id"]
        .as_str()
        .expect("delivery id")
        .replace('-', "");
    let mut params = form(&call.body);
    let signature = params.remove("Signature").expect("Signature");
    let nonce = params["SignatureNonce"].clone();
    let timestamp = params["Timestamp"].clone();
    assert!(
        timestamp.len() == 20 && timestamp.ends_with('Z'),
        "{timestamp}"
    );
    let expected: BTreeMap<String, String> = [
        ("AccessKeyId", ALIYUN_KEY_ID),
        ("Action", "SendSms"),
        ("Format", "JSON"),
        ("OutId", delivery_id.as_str()),
        ("PhoneNumbers", "13800138000"),
        ("RegionId", "cn-hangzhou"),
        ("SignName", "Herald演示"),
        ("SignatureMethod", "HMAC-SHA1"),
        ("SignatureNonce", nonce.as_str()),
        ("SignatureVersion", "1.0"),
        ("TemplateCode", "SMS_300001"),
        ("TemplateParam", r#"{"eta":"tomorrow","order":"SMS-A1"}"#),
        ("Timestamp", timestamp.as_str()),
        ("Version", "2017-05-25"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(params, expected);
    assert_eq!(
        signature,
        herald_sender::channels::sms::aliyun::signature("POST", &params, ALIYUN_SECRET)
    );
    let message = &env.stack.sandbox.sms_messages()[0];
    assert_eq!(delivery["provider_msgid"], message.msgid.as_str());
    let receipts = env.stack.sandbox.wait_for_sms_receipts(1, WAIT).await;
    assert_eq!(receipts[0].status, Some(200));
    assert_eq!(receipts[0].body[0]["biz_id"], message.msgid.as_str());
    assert_eq!(receipts[0].body[0]["out_id"], delivery_id.as_str());
    env.stop().await;
}

/// Sends one message per injected code (or fault), each waiting for the state it leads to.
async fn one_per_class(
    env: &mut TestEnv,
    provider: SmsProvider,
    make: impl Fn(&str) -> NotificationRequest,
    cases: &[(&str, DeliveryState, &str)],
) {
    for (i, (code, state, class)) in cases.iter().enumerate() {
        if code.starts_with("http_") {
            env.stack.sandbox.inject_faults(
                herald_sandbox::paths::SMS,
                vec![herald_sandbox::Fault::Status { status: 502 }],
            );
        } else {
            env.stack
                .sandbox
                .inject_sms_codes(provider, vec![code.to_string()]);
        }
        let request = make(&format!("C-{i}"));
        publish(env, &request).await;
        let event = env.wait_for_status(&request.id, *state).await;
        assert_eq!(
            event.error_code,
            if code.starts_with("http_") {
                "http_5xx"
            } else {
                code
            },
            "{class}"
        );
        if *state == DeliveryState::Retrying {
            // The next attempt is not injected: it goes out.
            env.wait_for_status(&request.id, DeliveryState::Delivered)
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tencent_answers_fall_into_their_classes() {
    let mut env = TestEnv::start().await;
    use_tencent(&env).await;
    one_per_class(
        &mut env,
        SmsProvider::TencentSms,
        |code| sms_request("login_code", PHONE, json!({"code": code})),
        &[
            (
                "InvalidParameterValue.IncorrectPhoneNumber",
                DeliveryState::Failed,
                "recipient",
            ),
            (
                "FailedOperation.PhoneNumberInBlacklist",
                DeliveryState::Failed,
                "recipient (blacklisted)",
            ),
            (
                "LimitExceeded.PhoneNumberDailyLimit",
                DeliveryState::Deferred,
                "per-number limit",
            ),
            (
                "FailedOperation.InsufficientBalanceInSmsPackage",
                DeliveryState::Failed,
                "config (balance)",
            ),
            (
                "FailedOperation.TemplateIncorrectOrUnapproved",
                DeliveryState::Failed,
                "template",
            ),
            ("InternalError.Timeout", DeliveryState::Retrying, "retry"),
            ("http_502", DeliveryState::Retrying, "transport"),
        ],
    )
    .await;
    // A real wrong signature (not injected): the twin's own check answers it.
    let view = {
        let tencent = requests_of(&env, SmsProvider::TencentSms);
        assert!(
            tencent
                .iter()
                .all(|r| r.code != "AuthFailure.SignatureFailure")
        );
        env.stack.sandbox.advance_clock(Duration::from_secs(600));
        let request = sms_request("login_code", PHONE, json!({"code": "stale"}));
        publish(&env, &request).await;
        env.wait_for_status(&request.id, DeliveryState::Failed)
            .await;
        env.get_message(&request.id).await
    };
    // Our clock ten minutes behind Tencent's: the signature has expired, which needs fixing.
    assert_eq!(
        view["deliveries"][0]["last_error_code"],
        "AuthFailure.SignatureExpire"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliyun_answers_fall_into_their_classes() {
    let mut env = TestEnv::start().await;
    one_per_class(
        &mut env,
        SmsProvider::AliyunSms,
        |order| order_request(order, "13800138000"),
        &[
            (
                "isv.MOBILE_NUMBER_ILLEGAL",
                DeliveryState::Failed,
                "recipient",
            ),
            (
                "isv.BUSINESS_LIMIT_CONTROL",
                DeliveryState::Deferred,
                "per-number limit",
            ),
            (
                "isv.AMOUNT_NOT_ENOUGH",
                DeliveryState::Failed,
                "config (balance)",
            ),
            (
                "isv.SMS_TEMPLATE_ILLEGAL",
                DeliveryState::Failed,
                "template",
            ),
            ("isp.SYSTEM_ERROR", DeliveryState::Retrying, "retry"),
            ("http_502", DeliveryState::Retrying, "transport"),
        ],
    )
    .await;
    // Our clock 20 minutes behind Aliyun's (its window is 15): the twin's own check refuses it.
    env.stack.sandbox.advance_clock(Duration::from_secs(1200));
    let request = order_request("C-stale", "13800138000");
    publish(&env, &request).await;
    let failed = env
        .wait_for_status(&request.id, DeliveryState::Failed)
        .await;
    assert_eq!(failed.error_code, "InvalidTimeStamp.Expired");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_secret_is_refused_by_the_twins_signature_check() {
    let mut env = TestEnv::start_with(|config| {
        let mut wrong = config.sender.sms.clone();
        for account in [seed::SMS_ALIYUN_ACCOUNT, seed::SMS_TENCENT_ACCOUNT] {
            let settings = herald_sender::channels::sms::SmsAccountSettings {
                provider: Some(if account == seed::SMS_ALIYUN_ACCOUNT {
                    herald_sender::channels::sms::SmsProvider::AliyunSms
                } else {
                    herald_sender::channels::sms::SmsProvider::TencentSms
                }),
                key_id: if account == seed::SMS_ALIYUN_ACCOUNT {
                    ALIYUN_KEY_ID.into()
                } else {
                    TENCENT_KEY_ID.into()
                },
                key_secret: "not-the-secret".into(),
                base_url: "http://127.0.0.1:8099".into(),
                sdk_app_id: "1400000001".into(),
                sign_name: "Herald演示".into(),
                ..Default::default()
            };
            wrong.insert(account.to_string(), settings);
        }
        config.sender.sms = wrong;
    })
    .await;
    let request = order_request("SMS-W1", "13800138000");
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Failed)
        .await;
    let view = env.get_message(&request.id).await;
    assert_eq!(
        view["deliveries"][0]["last_error_code"],
        "SignatureDoesNotMatch"
    );
    let calls = requests_of(&env, SmsProvider::AliyunSms);
    assert_eq!(calls.len(), 1, "config failures are not retried");
    use_tencent(&env).await;
    let request = sms_request("login_code", PHONE, json!({"code": "1"}));
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Failed)
        .await;
    let view = env.get_message(&request.id).await;
    assert_eq!(
        view["deliveries"][0]["last_error_code"],
        "AuthFailure.SignatureFailure"
    );
    assert!(env.stack.sandbox.sms_messages().is_empty());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_receipts_fail_the_delivery() {
    let mut env = TestEnv::start().await;
    env.stack.sandbox.set_sms_receipt(
        "13800138001",
        SmsReceipt::Failed {
            code: "MK:0001".into(),
            message: "用户手机号码停机".into(),
        },
    );
    let request = order_request("SMS-F1", "+8613800138001");
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Sent).await;
    let failed = env
        .wait_for_status(&request.id, DeliveryState::Failed)
        .await;
    assert!(failed.error_code.starts_with("MK:0001"), "{failed:?}");
    let delivery = delivery_in(&env, &request.id, "failed").await;
    assert!(
        delivery["last_error_code"]
            .as_str()
            .is_some_and(|c| c.starts_with("MK:0001")),
        "{delivery}"
    );

    // Tencent's FAIL report too.
    use_tencent(&env).await;
    let request = sms_request("login_code", "+8613800138001", json!({"code": "9"}));
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Failed)
        .await;
    let receipts = env.stack.sandbox.wait_for_sms_receipts(2, WAIT).await;
    assert_eq!(receipts[1].body[0]["report_status"], "FAIL");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_without_the_accounts_secret_are_refused_and_change_nothing() {
    let mut env = TestEnv::start_with(|config| {
        config.telemetry.admin_listen = Some("127.0.0.1:0".into());
    })
    .await;
    // No receipt from the twin: the test posts them itself.
    env.stack
        .sandbox
        .set_sms_receipt("13800138002", SmsReceipt::None);
    let request = order_request("SMS-U1", "13800138002");
    publish(&env, &request).await;
    env.wait_for_status(&request.id, DeliveryState::Sent).await;
    let delivery = delivery_in(&env, &request.id, "sent").await;
    let biz_id = delivery["provider_msgid"]
        .as_str()
        .expect("BizId")
        .to_string();
    let receipt = json!([{
        "phone_number": "13800138002", "send_time": "2026-11-23 10:00:00",
        "report_time": "2026-11-23 10:00:05", "success": true, "err_code": "DELIVERED",
        "err_msg": "用户接收成功", "sms_size": "1", "biz_id": biz_id, "out_id": "",
    }]);
    let url = format!(
        "{}/v1/callbacks/sms/{}",
        env.stack.callback_url,
        seed::SMS_ALIYUN_ACCOUNT
    );
    let no_token = env
        .http
        .post(&url)
        .json(&receipt)
        .send()
        .await
        .expect("answers");
    assert_eq!(no_token.status(), 401);
    let wrong_token = env
        .http
        .post(&url)
        .query(&[("token", "demo-aliyun-sms-receipt-token-0002")])
        .json(&receipt)
        .send()
        .await
        .expect("answers");
    assert_eq!(wrong_token.status(), 401);
    let wrong_basic = env
        .http
        .post(&url)
        .basic_auth("aliyun", Some("not-the-token"))
        .json(&receipt)
        .send()
        .await
        .expect("answers");
    assert_eq!(wrong_basic.status(), 401);
    // Another account's token does not open this account.
    let other = env
        .http
        .post(&url)
        .query(&[("token", seed::SMS_TENCENT_RECEIPT_TOKEN)])
        .json(&receipt)
        .send()
        .await
        .expect("answers");
    assert_eq!(other.status(), 401);
    env.scrape_until(|text| {
        herald_e2e::metric_sample(
            text,
            "herald_callback_requests_total",
            &[
                ("provider", "aliyun_sms"),
                ("account", seed::SMS_ALIYUN_ACCOUNT),
                ("outcome", "unauthenticated"),
            ],
        ) == Some(4.0)
    })
    .await;
    // Nothing changed: still sent, no delivered event in its history.
    let view = env.get_message(&request.id).await;
    assert_eq!(view["deliveries"][0]["state"], "sent", "{view}");

    // With the secret (as the Basic password), the same receipt is taken and folded in.
    let accepted = env
        .http
        .post(&url)
        .basic_auth("aliyun", Some(seed::SMS_ALIYUN_RECEIPT_TOKEN))
        .json(&receipt)
        .send()
        .await
        .expect("answers");
    assert_eq!(accepted.status(), 200);
    assert_eq!(
        accepted.json::<Value>().await.expect("JSON"),
        json!({"code": 0, "msg": "接收成功"})
    );
    env.wait_for_status(&request.id, DeliveryState::Delivered)
        .await;
    env.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The official SDKs: independent implementations of both signatures.

/// Installs the official SDKs from PyPI when missing (once per test binary: tests run in
/// parallel).
fn ensure_sdks() {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let present = Command::new("python3")
            .args([
                "-c",
                "import tencentcloud.sms.v20210111.sms_client, aliyunsdkcore.client",
            ])
            .status()
            .expect("python3 runs");
        if !present.success() {
            let pip = Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "tencentcloud-sdk-python-sms",
                    "aliyun-python-sdk-core",
                ])
                .status()
                .expect("pip runs");
            assert!(
                pip.success(),
                "pip install tencentcloud-sdk-python-sms aliyun-python-sdk-core"
            );
        }
    });
}

fn python(script: &str, args: &[&str]) -> Value {
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "python: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "python printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Tencent's SDK computes the signature of fixed inputs with its own code; ours must agree.
const TENCENT_FIXED: &str = r#"
import json, sys
from datetime import datetime
from tencentcloud.common.abstract_client import AbstractClient
from tencentcloud.common import credential
secret_id, secret_key, host, content_type, payload, timestamp = sys.argv[1:7]
class Req:
    method = "POST"
    uri = "/"
    data = payload
    header = {"Content-Type": content_type, "Host": host, "X-TC-Timestamp": timestamp}
client = AbstractClient.__new__(AbstractClient)
date = datetime.utcfromtimestamp(int(timestamp)).strftime("%Y-%m-%d")
signature = client._get_tc3_signature({}, Req(), date, "sms", secret_key)
print(json.dumps({"signature": signature}))
"#;

/// Tencent's SDK sends SendSms to the twin; the twin's check must take its signature.
const TENCENT_SDK_SEND: &str = r#"
import json, sys
from tencentcloud.common import credential
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.sms.v20210111 import sms_client, models
secret_id, secret_key, endpoint = sys.argv[1:4]
http = HttpProfile(endpoint=endpoint, reqMethod="POST")
http.scheme = "http"
client = sms_client.SmsClient(credential.Credential(secret_id, secret_key), "ap-guangzhou",
                              ClientProfile(httpProfile=http))
req = models.SendSmsRequest()
req.PhoneNumberSet = ["+8613800138009"]
req.SmsSdkAppId = "1400000001"
req.SignName = "Herald演示"
req.TemplateId = "1000001"
req.TemplateParamSet = ["424242", "5"]
resp = client.SendSms(req)
print(resp.to_json_string())
"#;

/// Aliyun's SDK signs a request (its own nonce and timestamp); ours over the same parameters
/// must give the same signature.
const ALIYUN_FIXED: &str = r#"
import json, sys
from urllib.parse import urlparse, parse_qsl
from aliyunsdkcore.auth.composer import rpc_signature_composer
key_id, secret = sys.argv[1:3]
params = {"Action": "SendSms", "Version": "2017-05-25", "RegionId": "cn-hangzhou",
          "PhoneNumbers": "13800138000", "SignName": "Herald演示", "TemplateCode": "SMS_300001",
          "TemplateParam": '{"eta":"tomorrow","order":"A 1*~"}', "OutId": "x"}
url, _ = rpc_signature_composer.get_signed_url(params, key_id, secret, "JSON", "POST", {})
print(json.dumps(dict(parse_qsl(urlparse(url).query, keep_blank_values=True))))
"#;

/// Aliyun's SDK sends SendSms to the twin.
const ALIYUN_SDK_SEND: &str = r#"
import json, sys
from aliyunsdkcore.client import AcsClient
from aliyunsdkcore.request import CommonRequest
key_id, secret, endpoint = sys.argv[1:4]
client = AcsClient(key_id, secret, "cn-hangzhou")
req = CommonRequest()
req.set_accept_format("json")
req.set_domain(endpoint)
req.set_protocol_type("http")
req.set_method("POST")
req.set_version("2017-05-25")
req.set_action_name("SendSms")
req.add_query_param("PhoneNumbers", "13800138009")
req.add_query_param("SignName", "Herald演示")
req.add_query_param("TemplateCode", "SMS_300001")
req.add_query_param("TemplateParam", '{"order":"SDK-1","eta":"today"}')
print(client.do_action_with_exception(req).decode())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdks_agree_with_our_signers_and_the_twins_checks() {
    ensure_sdks();
    let env = TestEnv::start().await;
    let endpoint = env
        .stack
        .sandbox_url
        .trim_start_matches("http://")
        .to_string();

    // Tencent: fixed inputs through the SDK's TC3 code and ours.
    let payload = r#"{"PhoneNumberSet":["+8613800138000"],"SmsSdkAppId":"1400000001","SignName":"Herald演示","TemplateId":"1000001","TemplateParamSet":["1 2*~"],"SessionContext":"x"}"#;
    for timestamp in ["1763856000", "1551113065"] {
        let sdk = python(
            TENCENT_FIXED,
            &[
                TENCENT_KEY_ID,
                TENCENT_SECRET,
                "sms.tencentcloudapi.com",
                "application/json; charset=utf-8",
                payload,
                timestamp,
            ],
        );
        let ours = herald_sender::channels::sms::tencent::authorization(
            "sms",
            TENCENT_KEY_ID,
            TENCENT_SECRET,
            "sms.tencentcloudapi.com",
            "application/json; charset=utf-8",
            payload.as_bytes(),
            timestamp.parse().expect("timestamp"),
        );
        let signature = ours.rsplit("Signature=").next().expect("signature");
        assert_eq!(sdk["signature"], signature, "TC3 at {timestamp}");
    }
    // The SDK's own request (its content type, its host with the port) passes the twin.
    let answer = python(
        TENCENT_SDK_SEND,
        &[TENCENT_KEY_ID, TENCENT_SECRET, &endpoint],
    );
    assert_eq!(answer["SendStatusSet"][0]["Code"], "Ok", "{answer}");
    // And with a wrong key the twin answers what Tencent does.
    let output = Command::new("python3")
        .args(["-c", TENCENT_SDK_SEND, TENCENT_KEY_ID, "wrong", &endpoint])
        .output()
        .expect("python3 runs");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("AuthFailure.SignatureFailure"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Aliyun: the SDK's signed parameters, recomputed by ours.
    let signed = python(ALIYUN_FIXED, &[ALIYUN_KEY_ID, ALIYUN_SECRET]);
    let mut params: BTreeMap<String, String> = signed
        .as_object()
        .expect("params")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    let sdk_signature = params.remove("Signature").expect("Signature");
    assert_eq!(
        herald_sender::channels::sms::aliyun::signature("POST", &params, ALIYUN_SECRET),
        sdk_signature
    );
    let answer = python(ALIYUN_SDK_SEND, &[ALIYUN_KEY_ID, ALIYUN_SECRET, &endpoint]);
    assert_eq!(answer["Code"], "OK", "{answer}");
    let output = Command::new("python3")
        .args(["-c", ALIYUN_SDK_SEND, ALIYUN_KEY_ID, "wrong", &endpoint])
        .output()
        .expect("python3 runs");
    // The twin answers SignatureDoesNotMatch with the string it signed, as Aliyun does.
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("SignatureDoesNotMatch Specified signature does not match our calculation. server string to sign is:POST&%2F&AccessKeyId"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    env.stop().await;
}
