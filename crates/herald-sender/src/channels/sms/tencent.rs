//! Tencent Cloud SMS, API 3.0: `POST /` with `X-TC-Action: SendSms`, `X-TC-Version:
//! 2021-01-11`, signed with TC3-HMAC-SHA256 over the JSON body and the `content-type` and
//! `host` headers.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{Account, Answer, HOUR, MINUTE, Outcome, Params, Rendered, exchange, unreadable};
use crate::channel::{AlertKind, Attempt, Defer, FailureKind};

pub const ACTION: &str = "SendSms";
pub const VERSION: &str = "2021-01-11";
pub const SERVICE: &str = "sms";
/// The body's type, as signed (`content-type` is a signed header).
pub const CONTENT_TYPE: &str = "application/json; charset=utf-8";

type HmacSha256 = Hmac<Sha256>;

fn hmac_sha256(key: &[u8], message: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key");
    mac.update(message.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The TC3-HMAC-SHA256 `Authorization` header for a `POST /` of `payload` at `timestamp` (unix
/// seconds), as Tencent Cloud's API 3.0 signature documentation defines it:
///
/// ```text
/// CanonicalRequest = "POST\n/\n\ncontent-type:<type>\nhost:<host>\n\ncontent-type;host\n" + hex(sha256(payload))
/// StringToSign     = "TC3-HMAC-SHA256\n" + timestamp + "\n" + date + "/sms/tc3_request\n" + hex(sha256(CanonicalRequest))
/// SecretSigning    = HMAC(HMAC(HMAC("TC3" + SecretKey, date), "sms"), "tc3_request")
/// Signature        = hex(HMAC(SecretSigning, StringToSign))
/// ```
///
/// `date` is the UTC date of `timestamp` (`2026-11-23`); `service` is `sms` for SendSms.
pub fn authorization(
    service: &str,
    secret_id: &str,
    secret_key: &str,
    host: &str,
    content_type: &str,
    payload: &[u8],
    timestamp: i64,
) -> String {
    let date = chrono::DateTime::from_timestamp(timestamp, 0)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string();
    let canonical_request = format!(
        "POST\n/\n\ncontent-type:{content_type}\nhost:{host}\n\ncontent-type;host\n{}",
        sha256_hex(payload)
    );
    let scope = format!("{date}/{service}/tc3_request");
    let string_to_sign = format!(
        "TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let secret_date = hmac_sha256(format!("TC3{secret_key}").as_bytes(), &date);
    let secret_service = hmac_sha256(&secret_date, service);
    let secret_signing = hmac_sha256(&secret_service, "tc3_request");
    let signature = hex::encode(hmac_sha256(&secret_signing, &string_to_sign));
    format!(
        "TC3-HMAC-SHA256 Credential={secret_id}/{scope}, SignedHeaders=content-type;host, Signature={signature}"
    )
}

/// Tencent's codes (the `Response.Error.Code` of a failed call, or the number's
/// `SendStatusSet[].Code`), classified. From the SendSms error code table.
pub fn classify(code: &str) -> Outcome {
    match code {
        "Ok" => Outcome::Sent,
        // Per-number frequency limits (the console's defaults: 1 in 30 s, 5 an hour, 10 a day
        // for the same number): wait them out, no attempt used.
        "LimitExceeded.PhoneNumberThirtySecondLimit" => {
            Outcome::Defer(Defer::For(Duration::from_secs(30)), None)
        }
        "LimitExceeded.PhoneNumberOneHourLimit" => Outcome::Defer(Defer::For(HOUR), None),
        "LimitExceeded.PhoneNumberDailyLimit"
        | "LimitExceeded.PhoneNumberSameContentDailyLimit" => {
            Outcome::Defer(Defer::QuotaReset, None)
        }
        "LimitExceeded.DeliveryFrequencyLimit" => Outcome::Defer(Defer::For(MINUTE), None),
        // The application's own daily cap: every send waits for the reset; an operator should
        // know.
        "LimitExceeded.AppDailyLimit"
        | "LimitExceeded.AppGlobalDailyLimit"
        | "LimitExceeded.AppMainlandChinaDailyLimit" => {
            Outcome::Defer(Defer::QuotaReset, Some(AlertKind::Quota))
        }
        // The recipient: a malformed or non-existent number, one that opted out or is
        // blacklisted, a region this account may not send to.
        "InvalidParameterValue.IncorrectPhoneNumber"
        | "FailedOperation.PhoneNumberInBlacklist"
        | "FailedOperation.PhoneNumberOnBlacklist"
        | "UnsupportedOperation.UnsupportedRegion"
        | "UnsupportedOperation.ChineseMainlandTemplateToGlobalPhone"
        | "UnsupportedOperation.GlobalTemplateToChineseMainlandPhone" => {
            Outcome::Permanent(FailureKind::Recipient)
        }
        // The template: unknown or unapproved, parameters that do not fit it.
        "FailedOperation.TemplateIncorrectOrUnapproved"
        | "FailedOperation.TemplateParamSetNotMatchApprovedTemplate"
        | "FailedOperation.ContainSensitiveWord"
        | "FailedOperation.TemplateUnapprovedOrNotExist"
        | "InvalidParameterValue.TemplateParameterFormatError"
        | "InvalidParameterValue.TemplateParameterLengthLimit"
        | "InvalidParameterValue.ProhibitedUseUrlInTemplateParameter"
        | "InvalidParameterValue.ContentLengthLimit" => Outcome::Permanent(FailureKind::Template),
        // The account: credentials, signature (签名), SDK app id, balance.
        "FailedOperation.SignatureIncorrectOrUnapproved"
        | "FailedOperation.InsufficientBalanceInSmsPackage"
        | "FailedOperation.MissingSignature"
        | "FailedOperation.MissingSignatureList"
        | "InvalidParameterValue.SdkAppIdNotExist"
        | "UnauthorizedOperation.SmsSdkAppIdVerifyFail"
        | "UnauthorizedOperation.IndividualUserMarketingSmsPermissionDeny"
        | "UnauthorizedOperation.SerivceSuspendDueToArrears"
        | "UnauthorizedOperation.RequestPermissionDeny"
        | "UnauthorizedOperation.RequestIpNotInWhitelist" => {
            Outcome::Permanent(FailureKind::Config)
        }
        // API-wide request rate: a short wait.
        "RequestLimitExceeded" => Outcome::Retry(false),
        code if code.starts_with("InternalError") => Outcome::Retry(true),
        // Wrong key, bad signature, our clock (SignatureExpire): nothing a retry fixes.
        code if code.starts_with("AuthFailure") || code.starts_with("UnauthorizedOperation") => {
            Outcome::Permanent(FailureKind::Config)
        }
        code if code.starts_with("LimitExceeded.PhoneNumber") => {
            Outcome::Defer(Defer::For(HOUR), None)
        }
        _ => Outcome::Permanent(FailureKind::Unknown),
    }
}

#[derive(Debug, Default, Deserialize)]
struct Envelope {
    #[serde(rename = "Response", default)]
    response: Response,
}

#[derive(Debug, Default, Deserialize)]
struct Response {
    #[serde(rename = "Error", default)]
    error: Option<ApiError>,
    #[serde(rename = "SendStatusSet", default)]
    send_status_set: Vec<SendStatus>,
    #[serde(rename = "RequestId", default)]
    request_id: String,
}

#[derive(Debug, Default, Deserialize)]
struct ApiError {
    #[serde(rename = "Code", default)]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
}

#[derive(Debug, Default, Deserialize)]
struct SendStatus {
    #[serde(rename = "SerialNo", default)]
    serial_no: String,
    #[serde(rename = "PhoneNumber", default)]
    phone_number: String,
    #[serde(rename = "Code", default)]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
}

/// The JSON body of one send (its bytes are what is signed).
pub fn body(
    account_sdk_app_id: &str,
    sign_name: &str,
    phone: &str,
    template_id: &str,
    params: &[String],
    session_context: &str,
) -> Vec<u8> {
    let body = json!({
        "PhoneNumberSet": [phone],
        "SmsSdkAppId": account_sdk_app_id,
        "SignName": sign_name,
        "TemplateId": template_id,
        "TemplateParamSet": params,
        "SessionContext": session_context,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Positional parameters: a list as it is; a map whose keys are the numbers `1`, `2`, … in
/// their order. Named parameters do not fit Tencent's `{1}` templates.
fn positional(params: &Params) -> Result<Vec<String>, Attempt> {
    match params {
        Params::Positional(list) => Ok(list.clone()),
        Params::Named(map) => {
            let mut numbered = Vec::with_capacity(map.len());
            for (key, value) in map {
                let Ok(n) = key.parse::<u32>() else {
                    return Err(Attempt::failed(
                        "sms_template",
                        format!(
                            "Tencent Cloud SMS templates take positional parameters ({{1}}, {{2}}, …): \
                             give the sms variant's params as a list, not named (`{key}`)"
                        ),
                        FailureKind::Template,
                    ));
                };
                numbered.push((n, value.clone()));
            }
            numbered.sort_by_key(|(n, _)| *n);
            Ok(numbered.into_iter().map(|(_, v)| v).collect())
        }
    }
}

/// One `SendSms` call for one number.
pub(crate) async fn send(
    http: &reqwest::Client,
    account: &Account,
    phone: &(String, String),
    rendered: &Rendered,
    delivery_id: Uuid,
) -> Result<Answer, Attempt> {
    let params = positional(&rendered.params)?;
    // E.164, as SendSms takes it.
    let number = format!("+{}{}", phone.0, phone.1);
    let payload = body(
        &account.sdk_app_id,
        &account.sign_name,
        &number,
        &rendered.template_id,
        &params,
        &delivery_id.simple().to_string(),
    );
    let timestamp = chrono::Utc::now().timestamp();
    let authorization = authorization(
        SERVICE,
        &account.key_id,
        &account.key_secret,
        &account.host(),
        CONTENT_TYPE,
        &payload,
        timestamp,
    );
    let request = http
        .post(account.url.clone())
        .header("Authorization", authorization)
        .header("Content-Type", CONTENT_TYPE)
        .header("X-TC-Action", ACTION)
        .header("X-TC-Version", VERSION)
        .header("X-TC-Timestamp", timestamp.to_string())
        .header("X-TC-Region", account.region.as_str())
        .body(payload);
    let (status, text) = exchange("tencent_sms", request).await?;
    // Tencent answers every API error with HTTP 200 and a `Response.Error`: any other status
    // is the gateway or the network.
    let envelope: Envelope = match serde_json::from_str(&text) {
        Ok(envelope) if status.is_success() => envelope,
        _ => return Err(unreadable("tencent_sms", status, "a JSON Response")),
    };
    let response = envelope.response;
    if let Some(error) = response.error {
        return Ok(Answer {
            code: error.code,
            message: format!("{} (RequestId {})", error.message, response.request_id),
            msgid: None,
        });
    }
    // One number per call: its own entry (the one for our number, else the only one).
    let status = response
        .send_status_set
        .iter()
        .find(|s| s.phone_number == number)
        .or(response.send_status_set.first());
    let Some(status) = status else {
        return Err(Attempt::Retry {
            code: "no_status".into(),
            message: format!(
                "tencent_sms answered without a SendStatusSet (RequestId {})",
                response.request_id
            ),
            provider_down: false,
        });
    };
    Ok(Answer {
        code: status.code.clone(),
        message: status.message.clone(),
        msgid: Some(status.serial_no.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc3_matches_the_documented_example() {
        // Tencent Cloud API 3.0 "Signature v3" documentation, worked example (CVM
        // DescribeInstances): hashed payload 35e9c5b0…, hashed canonical request 5ffe6a04…,
        // signature 72e494ea….
        let payload = br#"{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}"#;
        assert_eq!(
            sha256_hex(payload),
            "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
        );
        let header = authorization(
            "cvm",
            "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE",
            "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE",
            "cvm.tencentcloudapi.com",
            "application/json; charset=utf-8",
            payload,
            1_551_113_065,
        );
        assert_eq!(
            header,
            "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/2019-02-25/cvm/tc3_request, \
             SignedHeaders=content-type;host, \
             Signature=72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
        );
    }

    #[test]
    fn answer_table() {
        assert_eq!(classify("Ok"), Outcome::Sent);
        assert_eq!(
            classify("LimitExceeded.PhoneNumberDailyLimit"),
            Outcome::Defer(Defer::QuotaReset, None)
        );
        assert_eq!(
            classify("LimitExceeded.PhoneNumberThirtySecondLimit"),
            Outcome::Defer(Defer::For(Duration::from_secs(30)), None)
        );
        assert_eq!(
            classify("InvalidParameterValue.IncorrectPhoneNumber"),
            Outcome::Permanent(FailureKind::Recipient)
        );
        assert_eq!(
            classify("FailedOperation.PhoneNumberInBlacklist"),
            Outcome::Permanent(FailureKind::Recipient)
        );
        assert_eq!(
            classify("AuthFailure.SignatureFailure"),
            Outcome::Permanent(FailureKind::Config)
        );
        assert_eq!(
            classify("FailedOperation.InsufficientBalanceInSmsPackage"),
            Outcome::Permanent(FailureKind::Config)
        );
        assert_eq!(
            classify("FailedOperation.TemplateIncorrectOrUnapproved"),
            Outcome::Permanent(FailureKind::Template)
        );
        assert_eq!(classify("InternalError.Timeout"), Outcome::Retry(true));
        assert_eq!(
            classify("Something.New"),
            Outcome::Permanent(FailureKind::Unknown)
        );
    }

    #[test]
    fn params_must_be_positional() {
        let list = Params::Positional(vec!["a".into(), "b".into()]);
        assert_eq!(positional(&list).ok(), Some(vec!["a".into(), "b".into()]));
        let numbered = Params::Named(
            [("10", "j"), ("2", "b"), ("1", "a")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        assert_eq!(
            positional(&numbered).ok(),
            Some(vec!["a".into(), "b".into(), "j".into()])
        );
        let named = Params::Named([("order".to_string(), "A-1".to_string())].into());
        assert!(matches!(
            positional(&named),
            Err(Attempt::Failed {
                kind: FailureKind::Template,
                ..
            })
        ));
    }
}
