//! Aliyun SMS (Dysmsapi 2017-05-25) `SendSms`: the RPC API, every parameter in the form body,
//! signed with HMAC-SHA1 over the sorted, percent-encoded parameters.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha1::Sha1;
use uuid::Uuid;

use super::{
    Account, Answer, HOUR, MINUTE, Outcome, Params, Rendered, exchange, percent_encode, unreadable,
};
use crate::channel::{AlertKind, Attempt, Defer, FailureKind};

pub const ACTION: &str = "SendSms";
pub const VERSION: &str = "2017-05-25";

/// `Signature` of an RPC request, as Aliyun's signature documentation defines it:
///
/// ```text
/// CanonicalizedQueryString = the parameters but Signature, sorted by name, each
///                            percentEncode(name) + "=" + percentEncode(value), joined by "&"
/// StringToSign = METHOD + "&" + percentEncode("/") + "&" + percentEncode(CanonicalizedQueryString)
/// Signature    = base64(HMAC-SHA1(key = AccessKeySecret + "&", StringToSign))
/// ```
///
/// (before the signature itself is percent-encoded into the request).
pub fn signature(method: &str, params: &BTreeMap<String, String>, secret: &str) -> String {
    let canonical = params
        .iter()
        .filter(|(name, _)| name.as_str() != "Signature")
        .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
        .collect::<Vec<_>>()
        .join("&");
    let string_to_sign = format!(
        "{method}&{}&{}",
        percent_encode("/"),
        percent_encode(&canonical)
    );
    let mut mac =
        Hmac::<Sha1>::new_from_slice(format!("{secret}&").as_bytes()).expect("HMAC takes any key");
    mac.update(string_to_sign.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

/// Aliyun's codes, classified (the SendSms error code table). The per-number limit,
/// `isv.BUSINESS_LIMIT_CONTROL`, says in its message which window it hit: `触发分钟级流控`
/// (a minute), `触发小时级流控` (an hour), `触发天级流控` (a day).
pub fn classify(code: &str, message: &str) -> Outcome {
    match code {
        "OK" => Outcome::Sent,
        "isv.BUSINESS_LIMIT_CONTROL" => {
            let defer = if message.contains("天级") || message.contains("day") {
                Defer::QuotaReset
            } else if message.contains("小时级") || message.contains("hour") {
                Defer::For(HOUR)
            } else {
                Defer::For(MINUTE)
            };
            Outcome::Defer(defer, None)
        }
        "isv.DAY_LIMIT_CONTROL" => Outcome::Defer(Defer::QuotaReset, None),
        // The account's own sending quota.
        "isv.OUT_OF_SERVICE_DAY_LIMIT" => Outcome::Defer(Defer::QuotaReset, Some(AlertKind::Quota)),
        // The recipient's number: malformed, not a mobile number, blacklisted or opted out.
        "isv.MOBILE_NUMBER_ILLEGAL"
        | "isv.MOBILE_IN_BLACK"
        | "isv.BLACK_LIST_CONTROL"
        | "isv.UNSUBSCRIBE_MOBILE" => Outcome::Permanent(FailureKind::Recipient),
        // The template and its parameters.
        "isv.SMS_TEMPLATE_ILLEGAL"
        | "isv.TEMPLATE_MISSING_PARAMETERS"
        | "isv.INVALID_JSON_PARAM"
        | "isv.PARAM_LENGTH_LIMIT"
        | "isv.TEMPLATE_PARAMS_ILLEGAL"
        | "isv.BLACK_KEY_CONTROL_LIMIT"
        | "isv.SMS_CONTENT_ILLEGAL"
        | "isv.PARAM_NOT_SUPPORT_URL"
        | "isv.INVALID_PARAMETERS" => Outcome::Permanent(FailureKind::Template),
        // The account: credentials, signature (签名), balance, service state, permissions.
        "isv.AMOUNT_NOT_ENOUGH"
        | "isv.SMS_SIGNATURE_ILLEGAL"
        | "isv.SMS_SIGN_ILLEGAL"
        | "isv.OUT_OF_SERVICE"
        | "isv.PRODUCT_UN_SUBSCRIPT"
        | "isv.PRODUCT_UNSUBSCRIBE"
        | "isv.ACCOUNT_NOT_EXISTS"
        | "isv.ACCOUNT_ABNORMAL"
        | "isv.DENY_IP_RANGE"
        | "isp.RAM_PERMISSION_DENY"
        | "SignatureDoesNotMatch"
        | "InvalidAccessKeyId.NotFound"
        | "InvalidAccessKeyId.Inactive"
        | "InvalidTimeStamp.Expired"
        | "IncompleteSignature"
        | "Forbidden.RAM" => Outcome::Permanent(FailureKind::Config),
        // A nonce seen before: a fresh one on the next attempt.
        "SignatureNonceUsed" => Outcome::Retry(false),
        // API-wide throttling.
        "Throttling" | "Throttling.User" | "Throttling.Api" => Outcome::Retry(false),
        "isp.SYSTEM_ERROR" | "isp.GATEWAY_ERROR" | "InternalError" | "ServiceUnavailable" => {
            Outcome::Retry(true)
        }
        _ => Outcome::Permanent(FailureKind::Unknown),
    }
}

#[derive(Debug, Default, Deserialize)]
struct Response {
    #[serde(rename = "Code", default)]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
    #[serde(rename = "BizId", default)]
    biz_id: String,
    #[serde(rename = "RequestId", default)]
    request_id: String,
}

/// Named parameters as `TemplateParam` JSON (Aliyun's `${name}`); none: the parameter is left
/// out. Positional ones do not fit.
fn template_param(params: &Params) -> Result<Option<String>, Attempt> {
    match params {
        Params::Named(map) if map.is_empty() => Ok(None),
        Params::Positional(list) if list.is_empty() => Ok(None),
        Params::Named(map) => Ok(Some(serde_json::to_string(map).unwrap_or_default())),
        Params::Positional(_) => Err(Attempt::failed(
            "sms_template",
            "Aliyun SMS templates take named parameters (${name}): give the sms variant's \
             params as a map, not a list",
            FailureKind::Template,
        )),
    }
}

/// Every parameter of one `SendSms` call but the signature.
pub(crate) fn params(
    account: &Account,
    phone_numbers: &str,
    template_code: &str,
    template_param: Option<&str>,
    out_id: &str,
    timestamp: &str,
    nonce: &str,
) -> BTreeMap<String, String> {
    let mut params: BTreeMap<String, String> = [
        ("AccessKeyId", account.key_id.as_str()),
        ("Action", ACTION),
        ("Format", "JSON"),
        ("OutId", out_id),
        ("PhoneNumbers", phone_numbers),
        ("RegionId", account.region.as_str()),
        ("SignName", account.sign_name.as_str()),
        ("SignatureMethod", "HMAC-SHA1"),
        ("SignatureNonce", nonce),
        ("SignatureVersion", "1.0"),
        ("TemplateCode", template_code),
        ("Timestamp", timestamp),
        ("Version", VERSION),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(param) = template_param {
        params.insert("TemplateParam".into(), param.to_string());
    }
    params
}

/// One `SendSms` call for one number.
pub(crate) async fn send(
    http: &reqwest::Client,
    account: &Account,
    phone: &(String, String),
    rendered: &Rendered,
    delivery_id: Uuid,
) -> Result<Answer, Attempt> {
    let template_param = template_param(&rendered.params)?;
    // Mainland numbers as 11 digits; others as country code and number, no `+`.
    let number = if phone.0 == "86" {
        phone.1.clone()
    } else {
        format!("{}{}", phone.0, phone.1)
    };
    let timestamp = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let nonce = Uuid::new_v4().to_string();
    let mut params = params(
        account,
        &number,
        &rendered.template_id,
        template_param.as_deref(),
        &delivery_id.simple().to_string(),
        &timestamp,
        &nonce,
    );
    let signature = signature("POST", &params, &account.key_secret);
    params.insert("Signature".into(), signature);
    let body = params
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let request = http
        .post(account.url.clone())
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body);
    let (status, text) = exchange("aliyun_sms", request).await?;
    // Errors come with 4xx statuses (SignatureDoesNotMatch is a 400) and a JSON body too.
    let answer: Response = serde_json::from_str(&text).unwrap_or_default();
    if answer.code.is_empty() {
        return Err(unreadable("aliyun_sms", status, "a Code"));
    }
    Ok(Answer {
        message: format!("{} (RequestId {})", answer.message, answer.request_id),
        msgid: Some(answer.biz_id).filter(|b| !b.is_empty()),
        code: answer.code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_documented_example() {
        // Aliyun SMS "签名机制" worked example: AccessKeyId testId, secret testSecret, a GET
        // of SendSms; Signature zJDF+Lrzhj/ThnlvIToysFRq6t4= (zJDF%2BLrzhj%2FThnlvIToysFRq6t4%3D
        // in the URL).
        let params: BTreeMap<String, String> = [
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "45e25e9b-0a6f-4070-8c85-2956eda1b466"),
            ("AccessKeyId", "testId"),
            ("SignatureVersion", "1.0"),
            ("Timestamp", "2017-07-12T02:42:19Z"),
            ("Format", "XML"),
            ("Action", "SendSms"),
            ("Version", "2017-05-25"),
            ("RegionId", "cn-hangzhou"),
            ("PhoneNumbers", "15300000001"),
            ("SignName", "阿里云短信测试专用"),
            ("TemplateParam", "{\"customer\":\"test\"}"),
            ("TemplateCode", "SMS_71390007"),
            ("OutId", "123"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let signature = signature("GET", &params, "testSecret");
        assert_eq!(signature, "zJDF+Lrzhj/ThnlvIToysFRq6t4=");
        assert_eq!(
            percent_encode(&signature),
            "zJDF%2BLrzhj%2FThnlvIToysFRq6t4%3D"
        );
    }

    #[test]
    fn answer_table() {
        assert_eq!(classify("OK", "OK"), Outcome::Sent);
        assert_eq!(
            classify("isv.BUSINESS_LIMIT_CONTROL", "触发分钟级流控Permits:1"),
            Outcome::Defer(Defer::For(MINUTE), None)
        );
        assert_eq!(
            classify("isv.BUSINESS_LIMIT_CONTROL", "触发小时级流控Permits:5"),
            Outcome::Defer(Defer::For(HOUR), None)
        );
        assert_eq!(
            classify("isv.BUSINESS_LIMIT_CONTROL", "触发天级流控Permits:10"),
            Outcome::Defer(Defer::QuotaReset, None)
        );
        assert_eq!(
            classify("isv.MOBILE_NUMBER_ILLEGAL", ""),
            Outcome::Permanent(FailureKind::Recipient)
        );
        assert_eq!(
            classify("isv.AMOUNT_NOT_ENOUGH", ""),
            Outcome::Permanent(FailureKind::Config)
        );
        assert_eq!(
            classify("SignatureDoesNotMatch", ""),
            Outcome::Permanent(FailureKind::Config)
        );
        assert_eq!(
            classify("isv.SMS_TEMPLATE_ILLEGAL", ""),
            Outcome::Permanent(FailureKind::Template)
        );
        assert_eq!(classify("isp.SYSTEM_ERROR", ""), Outcome::Retry(true));
        assert_eq!(
            classify("isv.SOMETHING_NEW", ""),
            Outcome::Permanent(FailureKind::Unknown)
        );
    }

    #[test]
    fn params_must_be_named() {
        let named = Params::Named([("code".to_string(), "1234".to_string())].into());
        assert_eq!(
            template_param(&named).ok().flatten().as_deref(),
            Some(r#"{"code":"1234"}"#)
        );
        assert!(template_param(&Params::Positional(vec!["x".into()])).is_err());
        assert_eq!(
            template_param(&Params::Positional(Vec::new())).ok(),
            Some(None)
        );
    }
}
