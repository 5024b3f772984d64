//! SMS: Tencent Cloud SMS (API 3.0 `SendSms`, TC3-HMAC-SHA256) and Aliyun SMS (Dysmsapi
//! 2017-05-25 `SendSms`, the signed RPC API), both at `/` as on their own hosts: a request with
//! `X-TC-Action` is Tencent's, any other Aliyun's.
//!
//! Each checks a request as its provider does, in its order: the credential, the timestamp
//! window (Tencent: 5 minutes, `AuthFailure.SignatureExpire`; Aliyun: 15 minutes,
//! `InvalidTimeStamp.Expired`), Aliyun's nonce, the signature (`AuthFailure.SignatureFailure`,
//! `SignatureDoesNotMatch`), then the SDK app, sign name, template and parameters, and each
//! number (Tencent answers one `SendStatusSet` entry per number). Accepted messages get a
//! delivery receipt POSTed to the account's receipt URL, in the provider's format: Tencent's
//! `[{"user_receive_time", "nationcode", "mobile", "report_status", "errmsg", "description",
//! "sid"}]`, Aliyun's SmsReport `[{"phone_number", "send_time", "report_time", "success",
//! "err_code", "err_msg", "sms_size", "biz_id", "out_id"}]`. Neither provider signs them.
//!
//! The signature checks are written here independently of Herald's sender; both are checked
//! against the providers' documented examples and the official SDKs (tests/e2e/sms.rs).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeDelta, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;

use crate::Sandbox;

/// Which SMS provider a sandbox account plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmsProvider {
    TencentSms,
    AliyunSms,
}

/// An SMS account known to the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSmsAccount {
    pub provider: SmsProvider,
    /// Tencent SecretId / Aliyun AccessKeyId.
    pub key_id: String,
    /// Tencent SecretKey / Aliyun AccessKeySecret.
    pub key_secret: String,
    /// Tencent SmsSdkAppId.
    #[serde(default)]
    pub sdk_app_id: String,
    /// Approved signatures (签名).
    pub sign_names: Vec<String>,
    /// Approved templates: Tencent's by number of parameters (`keys` names them only for
    /// counting), Aliyun's by the `${name}`s they take.
    pub templates: Vec<crate::SandboxTemplate>,
    /// Where delivery receipts go; `None`: no receipts.
    #[serde(default)]
    pub receipt_url: Option<String>,
}

impl SandboxSmsAccount {
    /// The demo accounts the dev stack is wired to.
    pub fn demo() -> Vec<Self> {
        vec![
            Self {
                provider: SmsProvider::TencentSms,
                key_id: "AKIDdemo00000000000000000000000000".into(),
                key_secret: "demo-tencent-sms-secret-key-000001".into(),
                sdk_app_id: "1400000001".into(),
                sign_names: vec!["Herald演示".into()],
                templates: vec![crate::SandboxTemplate {
                    template_id: "1000001".into(),
                    keys: vec!["1".into(), "2".into()],
                }],
                receipt_url: None,
            },
            Self {
                provider: SmsProvider::AliyunSms,
                key_id: "LTAIdemo0000000000000001".into(),
                key_secret: "demo-aliyun-sms-secret-000001".into(),
                sdk_app_id: String::new(),
                sign_names: vec!["Herald演示".into()],
                templates: vec![crate::SandboxTemplate {
                    template_id: "SMS_300001".into(),
                    keys: vec!["order".into(), "eta".into()],
                }],
                receipt_url: None,
            },
        ]
    }
}

/// What the receipt of a number says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SmsReceipt {
    /// Delivered (Tencent `SUCCESS`/`DELIVRD`, Aliyun `success: true`/`DELIVERED`).
    Delivered,
    /// Not delivered, with the carrier's code (e.g. `MK:0001`, `UNDELIV`, `IC:0001`).
    Failed { code: String, message: String },
    /// No receipt at all.
    None,
}

/// A message the sandbox took for one number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmsMessage {
    pub provider: SmsProvider,
    pub key_id: String,
    /// As the request gave it (`+8613…` for Tencent, `13…` for Aliyun).
    pub phone: String,
    pub sign_name: String,
    pub template_id: String,
    /// Tencent's TemplateParamSet, or Aliyun's TemplateParam values by name.
    pub params: Value,
    /// Tencent SerialNo / Aliyun BizId.
    pub msgid: String,
    /// Tencent SessionContext / Aliyun OutId.
    pub context: String,
    pub at: DateTime<Utc>,
}

/// One SMS API request as received, whatever came of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmsRequest {
    pub provider: SmsProvider,
    pub method: String,
    /// Lower-case names; every header as sent (signatures are not secrets).
    pub headers: BTreeMap<String, String>,
    pub query: String,
    /// The body exactly as sent.
    pub body: String,
    /// The provider's code: `Ok`/`OK`, or the error.
    pub code: String,
}

/// A delivery receipt POST the sandbox made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmsReceiptAttempt {
    pub provider: SmsProvider,
    pub url: String,
    pub body: Value,
    pub status: Option<u16>,
    pub response: Option<String>,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
}

#[derive(Default)]
pub(crate) struct SmsState {
    /// By key id.
    pub(crate) accounts: HashMap<String, SandboxSmsAccount>,
    injected: HashMap<SmsProvider, VecDeque<String>>,
    /// By national number (digits, without +86).
    receipts: HashMap<String, SmsReceipt>,
    /// Aliyun nonces seen (with when, to forget them after the window).
    nonces: HashSet<String>,
    messages: Vec<SmsMessage>,
    requests: VecDeque<SmsRequest>,
    receipt_attempts: Vec<SmsReceiptAttempt>,
    next_id: u64,
}

impl SmsState {
    pub(crate) fn new(accounts: HashMap<String, SandboxSmsAccount>) -> Self {
        Self {
            accounts,
            ..Default::default()
        }
    }
}

const MAX_LOG: usize = 10_000;
/// Tencent: the timestamp may be at most 5 minutes off.
const TENCENT_WINDOW: TimeDelta = TimeDelta::minutes(5);
/// Aliyun: 15 minutes.
const ALIYUN_WINDOW: TimeDelta = TimeDelta::minutes(15);

/// A number's digits without a +86 / 0086 / 86 prefix before a mainland number.
fn national(phone: &str) -> String {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    for prefix in ["0086", "86"] {
        if let Some(rest) = digits.strip_prefix(prefix)
            && rest.len() == 11
            && rest.starts_with('1')
        {
            return rest.to_string();
        }
    }
    digits
}

impl Sandbox {
    /// Adds (or replaces) an SMS account.
    pub fn add_sms_account(&self, account: SandboxSmsAccount) {
        self.lock()
            .sms
            .accounts
            .insert(account.key_id.clone(), account);
    }

    /// Points an SMS account's receipts elsewhere (`None` stops them).
    pub fn set_sms_receipt_url(&self, key_id: &str, url: Option<String>) {
        if let Some(account) = self.lock().sms.accounts.get_mut(key_id) {
            account.receipt_url = url;
        }
    }

    /// The next `SendSms` calls to `provider` that pass authentication answer these codes, one
    /// per call in order (Tencent: `AuthFailure.*`, `InternalError*`, `RequestLimitExceeded`,
    /// `UnauthorizedOperation.*` and `InvalidParameter.*` as the call's `Error`, any other as
    /// the number's `SendStatusSet` code; Aliyun: the answer's `Code`). `Ok`/`OK` lets one call
    /// through; an empty list clears the queue.
    pub fn inject_sms_codes(&self, provider: SmsProvider, codes: Vec<String>) {
        let mut state = self.lock();
        if codes.is_empty() {
            state.sms.injected.remove(&provider);
        } else {
            state
                .sms
                .injected
                .entry(provider)
                .or_default()
                .extend(codes);
        }
    }

    /// The receipt for `phone` (any form: `+8613…`, `13…`); `Delivered` unless set.
    pub fn set_sms_receipt(&self, phone: &str, receipt: SmsReceipt) {
        self.lock().sms.receipts.insert(national(phone), receipt);
    }

    /// Every message accepted, oldest first.
    pub fn sms_messages(&self) -> Vec<SmsMessage> {
        self.lock().sms.messages.clone()
    }

    /// Every SMS API request, oldest first.
    pub fn sms_requests(&self) -> Vec<SmsRequest> {
        self.lock().sms.requests.iter().cloned().collect()
    }

    /// Every receipt POST made, oldest first.
    pub fn sms_receipts(&self) -> Vec<SmsReceiptAttempt> {
        self.lock().sms.receipt_attempts.clone()
    }

    /// Resolves once `n` receipt POSTs were made (or at `timeout`, with what there is).
    pub async fn wait_for_sms_receipts(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Vec<SmsReceiptAttempt> {
        let mut changed = self.inner.callbacks_changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = self.sms_receipts();
            if found.len() >= n {
                return found;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.sms_receipts(),
            }
        }
    }

    fn take_sms_code(&self, provider: SmsProvider) -> Option<String> {
        let mut state = self.lock();
        let queue = state.sms.injected.get_mut(&provider)?;
        let code = queue.pop_front();
        if queue.is_empty() {
            state.sms.injected.remove(&provider);
        }
        code
    }

    fn log_sms_request(&self, request: SmsRequest) {
        let mut state = self.lock();
        if state.sms.requests.len() >= MAX_LOG {
            state.sms.requests.pop_front();
        }
        state.sms.requests.push_back(request);
    }
}

/// `/`: Tencent when `X-TC-Action` is there, else Aliyun.
pub(crate) async fn root(
    State(sandbox): State<Sandbox>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header_map: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let query = uri.query().unwrap_or_default().to_owned();
    let text = String::from_utf8_lossy(&body).into_owned();
    let (provider, code, response) = if header_map.contains_key("x-tc-action") {
        let (code, response) = tencent(&sandbox, &method, &query, &header_map, &body);
        (SmsProvider::TencentSms, code, response)
    } else {
        let (code, response) = aliyun(&sandbox, &method, &query, &header_map, &text);
        (SmsProvider::AliyunSms, code, response)
    };
    sandbox.log_sms_request(SmsRequest {
        provider,
        method: method.to_string(),
        headers: header_map,
        query,
        body: text,
        code,
    });
    sandbox.inner.requests_changed.send_modify(|n| *n += 1);
    response
}

// ---------------------------------------------------------------------------------------------
// Tencent Cloud

fn tencent_message(code: &str) -> &'static str {
    match code {
        "AuthFailure.SignatureFailure" => {
            "The provided credentials could not be validated. Please check your signature is correct."
        }
        "AuthFailure.SignatureExpire" => {
            "Signature expired. Timestamp and server time cannot differ by more than five minutes."
        }
        "AuthFailure.SecretIdNotFound" => {
            "The SecretId is not found, please ensure that your SecretId is correct."
        }
        "AuthFailure.InvalidAuthorization" => "Authorization header is invalid.",
        "InvalidAction" => "The requested action does not exist.",
        "UnauthorizedOperation.SmsSdkAppIdVerifyFail" => "SmsSdkAppId verification failed.",
        "FailedOperation.SignatureIncorrectOrUnapproved" => {
            "The signature is not approved or is incorrect."
        }
        "FailedOperation.TemplateIncorrectOrUnapproved" => {
            "The template is not approved or the request content does not match the approved template."
        }
        "FailedOperation.TemplateParamSetNotMatchApprovedTemplate" => {
            "The number of parameters does not match the approved template."
        }
        "FailedOperation.InsufficientBalanceInSmsPackage" => {
            "The SMS package balance is insufficient."
        }
        "FailedOperation.PhoneNumberInBlacklist" => "The mobile number is in the blocklist.",
        "InvalidParameterValue.IncorrectPhoneNumber" => "Incorrect mobile number format.",
        "LimitExceeded.PhoneNumberThirtySecondLimit" => {
            "The frequency limit for sending SMS messages to a single mobile number within 30 seconds is exceeded."
        }
        "LimitExceeded.PhoneNumberOneHourLimit" => {
            "The frequency limit for sending SMS messages to a single mobile number within 1 hour is exceeded."
        }
        "LimitExceeded.PhoneNumberDailyLimit" => {
            "The limit for sending SMS messages to a single mobile number on the current day is exceeded."
        }
        "InternalError.Timeout" => "Request timed out.",
        "InternalError.OtherError" => "Other error.",
        "RequestLimitExceeded" => "Your current request is exceeding the frequency limit.",
        "Ok" => "send success",
        _ => "sandbox: injected error",
    }
}

/// Codes answered for the whole call rather than per number.
fn tencent_call_level(code: &str) -> bool {
    [
        "AuthFailure",
        "InternalError",
        "RequestLimitExceeded",
        "UnauthorizedOperation",
        "InvalidParameter.",
        "MissingParameter",
        "InvalidAction",
    ]
    .iter()
    .any(|prefix| code.starts_with(prefix))
}

fn tencent_error(code: &str) -> (String, Response) {
    let body = json!({"Response": {
        "Error": {"Code": code, "Message": tencent_message(code)},
        "RequestId": uuid_like(),
    }});
    (code.to_owned(), axum::Json(body).into_response())
}

fn uuid_like() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

type Sha256Mac = Hmac<sha2::Sha256>;

fn mac256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <Sha256Mac as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The signature Tencent expects for this request (TC3-HMAC-SHA256, SignedHeaders as the
/// request names them).
#[allow(clippy::too_many_arguments)]
fn tc3_expected(
    secret_key: &str,
    method: &str,
    query: &str,
    headers: &BTreeMap<String, String>,
    signed_headers: &str,
    body: &[u8],
    timestamp: i64,
    service: &str,
) -> String {
    let day = DateTime::from_timestamp(timestamp, 0)
        .map(|t| t.date_naive().to_string())
        .unwrap_or_default();
    let mut canonical_headers = String::new();
    for name in signed_headers.split(';') {
        let value = headers.get(name).map(|v| v.trim().to_ascii_lowercase());
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(value.as_deref().unwrap_or(""));
        canonical_headers.push('\n');
    }
    let payload_hash = hex::encode(sha2::Sha256::digest(body));
    let request = [
        method,
        "/",
        query,
        canonical_headers.as_str(),
        signed_headers,
        payload_hash.as_str(),
    ]
    .join("\n");
    let to_sign = [
        "TC3-HMAC-SHA256".to_owned(),
        timestamp.to_string(),
        format!("{day}/{service}/tc3_request"),
        hex::encode(sha2::Sha256::digest(request.as_bytes())),
    ]
    .join("\n");
    let mut key = mac256(format!("TC3{secret_key}").as_bytes(), day.as_bytes());
    key = mac256(&key, service.as_bytes());
    key = mac256(&key, b"tc3_request");
    hex::encode(mac256(&key, to_sign.as_bytes()))
}

/// `Authorization: TC3-HMAC-SHA256 Credential=<id>/<date>/<service>/tc3_request,
/// SignedHeaders=<h1;h2>, Signature=<hex>` → (id, date, service, signed headers, signature).
fn parse_tc3(header: &str) -> Option<(String, String, String, String, String)> {
    let rest = header.strip_prefix("TC3-HMAC-SHA256 ")?;
    let mut fields = HashMap::new();
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        fields.insert(k.to_owned(), v.to_owned());
    }
    let credential = fields.get("Credential")?;
    let mut scope = credential.split('/');
    let (id, date, service, end) = (scope.next()?, scope.next()?, scope.next()?, scope.next()?);
    if end != "tc3_request" || scope.next().is_some() {
        return None;
    }
    Some((
        id.to_owned(),
        date.to_owned(),
        service.to_owned(),
        fields.get("SignedHeaders")?.clone(),
        fields.get("Signature")?.clone(),
    ))
}

fn tencent(
    sandbox: &Sandbox,
    method: &Method,
    query: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
) -> (String, Response) {
    let now = sandbox.clock().now();
    let Some((key_id, date, service, signed_headers, signature)) =
        headers.get("authorization").and_then(|h| parse_tc3(h))
    else {
        return tencent_error("AuthFailure.InvalidAuthorization");
    };
    let Some(timestamp) = headers
        .get("x-tc-timestamp")
        .and_then(|t| t.trim().parse::<i64>().ok())
    else {
        return tencent_error("MissingParameter");
    };
    if DateTime::from_timestamp(timestamp, 0).is_none_or(|t| (now - t).abs() > TENCENT_WINDOW) {
        return tencent_error("AuthFailure.SignatureExpire");
    }
    let account = sandbox.lock().sms.accounts.get(&key_id).cloned();
    let Some(account) = account.filter(|a| a.provider == SmsProvider::TencentSms) else {
        return tencent_error("AuthFailure.SecretIdNotFound");
    };
    let signed: Vec<&str> = signed_headers.split(';').collect();
    let scope_ok = service == "sms"
        && DateTime::from_timestamp(timestamp, 0)
            .is_some_and(|t| t.date_naive().to_string() == date)
        && signed.contains(&"content-type")
        && signed.contains(&"host");
    let expected = tc3_expected(
        &account.key_secret,
        method.as_str(),
        if *method == Method::GET { query } else { "" },
        headers,
        &signed_headers,
        if *method == Method::GET { b"" } else { body },
        timestamp,
        &service,
    );
    if !scope_ok || expected != signature {
        return tencent_error("AuthFailure.SignatureFailure");
    }
    if headers.get("x-tc-action").map(String::as_str) != Some("SendSms")
        || headers.get("x-tc-version").map(String::as_str) != Some("2021-01-11")
    {
        return tencent_error("InvalidAction");
    }
    let injected = sandbox.take_sms_code(SmsProvider::TencentSms);
    if let Some(code) = injected.as_deref().filter(|c| tencent_call_level(c)) {
        return tencent_error(code);
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return tencent_error("InvalidParameter.JsonParseFail");
    };
    let text = |key: &str| request.get(key).and_then(Value::as_str).unwrap_or_default();
    if text("SmsSdkAppId") != account.sdk_app_id {
        return tencent_error("UnauthorizedOperation.SmsSdkAppIdVerifyFail");
    }
    let phones: Vec<String> = request
        .get("PhoneNumberSet")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if phones.is_empty() || phones.len() > 200 {
        return tencent_error("InvalidParameter.PhoneNumberSet");
    }
    let params: Vec<Value> = request
        .get("TemplateParamSet")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let session = text("SessionContext").to_owned();
    // The account's checks, answered for every number alike.
    let account_code = if !account.sign_names.iter().any(|s| s == text("SignName")) {
        Some("FailedOperation.SignatureIncorrectOrUnapproved")
    } else {
        match account
            .templates
            .iter()
            .find(|t| t.template_id == text("TemplateId"))
        {
            None => Some("FailedOperation.TemplateIncorrectOrUnapproved"),
            Some(t) if t.keys.len() != params.len() => {
                Some("FailedOperation.TemplateParamSetNotMatchApprovedTemplate")
            }
            Some(_) => None,
        }
    };
    let mut statuses = Vec::with_capacity(phones.len());
    let mut accepted = Vec::new();
    let mut first_code = None;
    for (i, phone) in phones.iter().enumerate() {
        let valid = phone.starts_with('+')
            && phone[1..].chars().all(|c| c.is_ascii_digit())
            && (6..=16).contains(&phone.len())
            && (!phone.starts_with("+86") || (phone.len() == 14 && phone[3..].starts_with('1')));
        let code = match (&injected, account_code) {
            (Some(code), _) if i == 0 && code != "Ok" => code.clone(),
            (_, Some(code)) => code.to_owned(),
            _ if !valid => "InvalidParameterValue.IncorrectPhoneNumber".to_owned(),
            _ => "Ok".to_owned(),
        };
        let serial = if code == "Ok" {
            let mut state = sandbox.lock();
            state.sms.next_id += 1;
            format!("2433:{}{:010}", now.timestamp(), state.sms.next_id)
        } else {
            String::new()
        };
        if code == "Ok" {
            accepted.push(SmsMessage {
                provider: SmsProvider::TencentSms,
                key_id: account.key_id.clone(),
                phone: phone.clone(),
                sign_name: text("SignName").to_owned(),
                template_id: text("TemplateId").to_owned(),
                params: Value::Array(params.clone()),
                msgid: serial.clone(),
                context: session.clone(),
                at: now,
            });
        }
        first_code.get_or_insert_with(|| code.clone());
        statuses.push(json!({
            "SerialNo": serial,
            "PhoneNumber": phone,
            "Fee": if code == "Ok" { 1 } else { 0 },
            "SessionContext": session,
            "Code": code,
            "Message": tencent_message(&code),
            "IsoCode": if phone.starts_with("+86") { "CN" } else { "" },
        }));
    }
    record_accepted(sandbox, &account, accepted);
    let body = json!({"Response": {"SendStatusSet": statuses, "RequestId": uuid_like()}});
    (
        first_code.unwrap_or_default(),
        axum::Json(body).into_response(),
    )
}

// ---------------------------------------------------------------------------------------------
// Aliyun

fn aliyun_message(code: &str) -> &'static str {
    match code {
        "OK" => "OK",
        "SignatureDoesNotMatch" => "Specified signature does not match our calculation.",
        "InvalidAccessKeyId.NotFound" => "Specified access key is not found.",
        "InvalidTimeStamp.Expired" => "Specified time stamp or date value is expired.",
        "SignatureNonceUsed" => "Specified signature nonce was used already.",
        "MissingParameter" => "A required parameter is missing.",
        "InvalidAction.NotFound" => "Specified api is not found, please check your url and method.",
        "isv.MOBILE_NUMBER_ILLEGAL" => "非法手机号",
        "isv.BUSINESS_LIMIT_CONTROL" => "触发分钟级流控Permits:1",
        "isv.DAY_LIMIT_CONTROL" => "触发日发送限额",
        "isv.AMOUNT_NOT_ENOUGH" => "账户余额不足",
        "isv.SMS_SIGNATURE_ILLEGAL" => "该账号下找不到对应签名",
        "isv.SMS_TEMPLATE_ILLEGAL" => "该账号下找不到对应模板",
        "isv.TEMPLATE_MISSING_PARAMETERS" => "模板变量中存在未赋值变量",
        "isv.INVALID_JSON_PARAM" => "JSON参数不合法，只接受字符串值",
        "isp.SYSTEM_ERROR" => "系统错误",
        _ => "sandbox: injected error",
    }
}

fn aliyun_error(status: StatusCode, code: &str) -> (String, Response) {
    aliyun_error_with(status, code, aliyun_message(code))
}

fn aliyun_error_with(status: StatusCode, code: &str, message: &str) -> (String, Response) {
    let body = json!({
        "RequestId": uuid_like().to_ascii_uppercase(),
        "HostId": "dysmsapi.aliyuncs.com",
        "Code": code,
        "Message": message,
        "Recommend": format!("https://api.aliyun.com/troubleshoot?q={code}&product=Dysmsapi"),
    });
    (code.to_owned(), (status, axum::Json(body)).into_response())
}

/// `application/x-www-form-urlencoded` pairs, decoded (`+` is a space).
fn form_pairs(text: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(text.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Aliyun's POP encoding: URL-encode, then `+`→`%20`, `*`→`%2A`, `%7E`→`~` (what its SDKs do),
/// i.e. every byte but RFC 3986's unreserved characters encoded.
fn pop_encode(text: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, RESERVED).to_string()
}

/// The signature Aliyun expects, and the string it signed (its error message shows it).
fn aliyun_expected(
    method: &str,
    params: &BTreeMap<String, String>,
    secret: &str,
) -> (String, String) {
    let sorted: Vec<String> = params
        .iter()
        .filter(|(k, _)| *k != "Signature")
        .map(|(k, v)| format!("{}={}", pop_encode(k), pop_encode(v)))
        .collect();
    let to_sign = format!("{method}&%2F&{}", pop_encode(&sorted.join("&")));
    let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(format!("{secret}&").as_bytes())
        .expect("any key length");
    mac.update(to_sign.as_bytes());
    (
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()),
        to_sign,
    )
}

fn aliyun(
    sandbox: &Sandbox,
    method: &Method,
    query: &str,
    headers: &BTreeMap<String, String>,
    body: &str,
) -> (String, Response) {
    let now = sandbox.clock().now();
    let mut params: BTreeMap<String, String> = form_pairs(query).into_iter().collect();
    let form = headers
        .get("content-type")
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    if *method == Method::POST && form {
        params.extend(form_pairs(body));
    }
    let get = |k: &str| params.get(k).cloned().unwrap_or_default();
    for required in [
        "AccessKeyId",
        "Signature",
        "SignatureMethod",
        "SignatureVersion",
        "SignatureNonce",
        "Timestamp",
        "Action",
        "Version",
    ] {
        if !params.contains_key(required) {
            return aliyun_error(StatusCode::BAD_REQUEST, "MissingParameter");
        }
    }
    let account = sandbox
        .lock()
        .sms
        .accounts
        .get(&get("AccessKeyId"))
        .cloned();
    let Some(account) = account.filter(|a| a.provider == SmsProvider::AliyunSms) else {
        return aliyun_error(StatusCode::NOT_FOUND, "InvalidAccessKeyId.NotFound");
    };
    let fresh = NaiveDateTime::parse_from_str(&get("Timestamp"), "%Y-%m-%dT%H:%M:%SZ")
        .ok()
        .map(|t| t.and_utc())
        .is_some_and(|t| (now - t).abs() <= ALIYUN_WINDOW);
    if !fresh {
        return aliyun_error(StatusCode::BAD_REQUEST, "InvalidTimeStamp.Expired");
    }
    if get("SignatureMethod") != "HMAC-SHA1" || get("SignatureVersion") != "1.0" {
        return aliyun_error(StatusCode::BAD_REQUEST, "SignatureDoesNotMatch");
    }
    let (expected, to_sign) = aliyun_expected(method.as_str(), &params, &account.key_secret);
    if expected != get("Signature") {
        // As Aliyun does: the message ends with the string the server signed (its SDKs read it
        // to tell a wrong secret from a wrongly built request).
        return aliyun_error_with(
            StatusCode::BAD_REQUEST,
            "SignatureDoesNotMatch",
            &format!(
                "Specified signature does not match our calculation. server string to sign is:{to_sign}"
            ),
        );
    }
    // The nonce counts once the request is authentic.
    if !sandbox.lock().sms.nonces.insert(get("SignatureNonce")) {
        return aliyun_error(StatusCode::BAD_REQUEST, "SignatureNonceUsed");
    }
    if get("Action") != "SendSms" || get("Version") != "2017-05-25" {
        return aliyun_error(StatusCode::NOT_FOUND, "InvalidAction.NotFound");
    }
    if let Some(code) = sandbox
        .take_sms_code(SmsProvider::AliyunSms)
        .filter(|c| c != "OK")
    {
        let status = if code.starts_with("isp.") || code == "InternalError" {
            StatusCode::INTERNAL_SERVER_ERROR
        } else if code.starts_with("isv.") {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        };
        return aliyun_error(status, &code);
    }
    let ok = |code: &str| aliyun_error(StatusCode::OK, code);
    for required in ["PhoneNumbers", "SignName", "TemplateCode"] {
        if get(required).is_empty() {
            return aliyun_error(StatusCode::BAD_REQUEST, "MissingParameter");
        }
    }
    if !account.sign_names.contains(&get("SignName")) {
        return ok("isv.SMS_SIGNATURE_ILLEGAL");
    }
    let Some(template) = account
        .templates
        .iter()
        .find(|t| t.template_id == get("TemplateCode"))
    else {
        return ok("isv.SMS_TEMPLATE_ILLEGAL");
    };
    let param: serde_json::Map<String, Value> = match params.get("TemplateParam") {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) if map.values().all(Value::is_string) => map,
            _ => return ok("isv.INVALID_JSON_PARAM"),
        },
    };
    if template.keys.iter().any(|k| !param.contains_key(k)) {
        return ok("isv.TEMPLATE_MISSING_PARAMETERS");
    }
    let phones: Vec<String> = get("PhoneNumbers").split(',').map(str::to_owned).collect();
    let valid = |p: &str| {
        let n = national(p);
        p.chars().all(|c| c.is_ascii_digit())
            && ((n.len() == 11 && n.starts_with('1')) || (p.len() > 11 && p.len() <= 16))
    };
    if phones.is_empty() || phones.len() > 1000 || !phones.iter().all(|p| valid(p)) {
        return ok("isv.MOBILE_NUMBER_ILLEGAL");
    }
    let biz_id = {
        let mut state = sandbox.lock();
        state.sms.next_id += 1;
        format!(
            "{}{:06}^0",
            now.timestamp_millis(),
            state.sms.next_id % 1_000_000
        )
    };
    let messages = phones
        .iter()
        .map(|phone| SmsMessage {
            provider: SmsProvider::AliyunSms,
            key_id: account.key_id.clone(),
            phone: phone.clone(),
            sign_name: get("SignName"),
            template_id: get("TemplateCode"),
            params: Value::Object(param.clone()),
            msgid: biz_id.clone(),
            context: get("OutId"),
            at: now,
        })
        .collect();
    record_accepted(sandbox, &account, messages);
    let body = json!({
        "Code": "OK",
        "Message": "OK",
        "BizId": biz_id,
        "RequestId": uuid_like().to_ascii_uppercase(),
    });
    ("OK".into(), axum::Json(body).into_response())
}

// ---------------------------------------------------------------------------------------------
// Control routes (not logged), for the dev stack and out-of-process tests

#[derive(Deserialize)]
struct InjectCodes {
    provider: SmsProvider,
    codes: Vec<String>,
}

#[derive(Deserialize)]
struct SetReceipt {
    phone: String,
    receipt: SmsReceipt,
}

/// `POST /_sandbox/sms/codes` `{"provider": "tencent_sms", "codes": ["LimitExceeded.PhoneNumberDailyLimit"]}`,
/// `POST /_sandbox/sms/receipts` `{"phone": "+8613800138000", "receipt": {"kind": "failed", "code": "MK:0001", "message": "…"}}`,
/// `GET /_sandbox/sms/messages`, `GET /_sandbox/sms/requests`, `GET /_sandbox/sms/receipts`.
pub(crate) fn control_routes() -> axum::Router<Sandbox> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route(
            "/_sandbox/sms/codes",
            post(
                |State(sandbox): State<Sandbox>, axum::Json(body): axum::Json<InjectCodes>| async move {
                    sandbox.inject_sms_codes(body.provider, body.codes);
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .route(
            "/_sandbox/sms/receipts",
            post(
                |State(sandbox): State<Sandbox>, axum::Json(body): axum::Json<SetReceipt>| async move {
                    sandbox.set_sms_receipt(&body.phone, body.receipt);
                    StatusCode::NO_CONTENT
                },
            )
            .get(|State(sandbox): State<Sandbox>| async move {
                axum::Json(sandbox.sms_receipts())
            }),
        )
        .route(
            "/_sandbox/sms/messages",
            get(|State(sandbox): State<Sandbox>| async move { axum::Json(sandbox.sms_messages()) }),
        )
        .route(
            "/_sandbox/sms/requests",
            get(|State(sandbox): State<Sandbox>| async move { axum::Json(sandbox.sms_requests()) }),
        )
}

// ---------------------------------------------------------------------------------------------
// Receipts

fn record_accepted(sandbox: &Sandbox, account: &SandboxSmsAccount, messages: Vec<SmsMessage>) {
    if messages.is_empty() {
        return;
    }
    {
        let mut state = sandbox.lock();
        for message in &messages {
            if state.sms.messages.len() >= MAX_LOG {
                state.sms.messages.remove(0);
            }
            state.sms.messages.push(message.clone());
        }
    }
    let sandbox = sandbox.clone();
    let key_id = account.key_id.clone();
    tokio::spawn(async move {
        let config = &sandbox.inner.config;
        tokio::time::sleep(Duration::from_millis(config.callback_delay_ms)).await;
        // Read the account when the receipt is due, as the provider reads its console's URL.
        let Some((provider, url)) = sandbox
            .lock()
            .sms
            .accounts
            .get(&key_id)
            .and_then(|a| Some((a.provider, a.receipt_url.clone()?)))
        else {
            return;
        };
        let items: Vec<Value> = messages
            .iter()
            .filter_map(|m| receipt_item(&sandbox, provider, m))
            .collect();
        if items.is_empty() {
            return;
        }
        let body = Value::Array(items);
        let attempts = config.callback_attempts.max(1);
        for attempt in 1..=attempts {
            let sent = sandbox
                .inner
                .http
                .post(&url)
                .timeout(Duration::from_millis(config.callback_timeout_ms))
                .json(&body)
                .send()
                .await;
            let (status, response, error) = match sent {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    (Some(status), Some(text.chars().take(512).collect()), None)
                }
                Err(e) => (None, None, Some(e.without_url().to_string())),
            };
            let accepted = status == Some(200);
            tracing::info!(?provider, attempt, ?status, accepted, "SMS receipt pushed");
            sandbox.lock().sms.receipt_attempts.push(SmsReceiptAttempt {
                provider,
                url: url.clone(),
                body: body.clone(),
                status,
                response,
                error,
                at: sandbox.clock().now(),
            });
            sandbox.inner.callbacks_changed.send_modify(|n| *n += 1);
            // A 401 will not turn into a 200 by asking again.
            if accepted || status == Some(401) {
                return;
            }
            if attempt < attempts {
                tokio::time::sleep(Duration::from_millis(config.callback_retry_interval_ms)).await;
            }
        }
    });
}

fn beijing(at: DateTime<Utc>) -> String {
    let offset = FixedOffset::east_opt(8 * 3600).expect("+08:00");
    at.with_timezone(&offset)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

fn receipt_item(sandbox: &Sandbox, provider: SmsProvider, message: &SmsMessage) -> Option<Value> {
    let receipt = sandbox
        .lock()
        .sms
        .receipts
        .get(&national(&message.phone))
        .cloned()
        .unwrap_or(SmsReceipt::Delivered);
    let now = sandbox.clock().now();
    let (success, code, text) = match receipt {
        SmsReceipt::None => return None,
        SmsReceipt::Delivered => (true, None, None),
        SmsReceipt::Failed { code, message } => (false, Some(code), Some(message)),
    };
    Some(match provider {
        SmsProvider::TencentSms => {
            let digits: String = message.phone.chars().filter(char::is_ascii_digit).collect();
            let nationcode = if digits.starts_with("86") { "86" } else { "" };
            json!({
                "user_receive_time": beijing(now),
                "nationcode": nationcode,
                "mobile": national(&message.phone),
                "report_status": if success { "SUCCESS" } else { "FAIL" },
                "errmsg": code.unwrap_or_else(|| "DELIVRD".into()),
                "description": text.unwrap_or_else(|| "用户短信送达成功".into()),
                "sid": message.msgid,
            })
        }
        SmsProvider::AliyunSms => json!({
            "phone_number": message.phone,
            "send_time": beijing(message.at),
            "report_time": beijing(now),
            "success": success,
            "err_code": code.unwrap_or_else(|| "DELIVERED".into()),
            "err_msg": text.unwrap_or_else(|| "用户接收成功".into()),
            "sms_size": "1",
            "biz_id": message.msgid,
            "out_id": message.context,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliyun_check_matches_the_documented_example() {
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
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            aliyun_expected("GET", &params, "testSecret").0,
            "zJDF+Lrzhj/ThnlvIToysFRq6t4="
        );
        // And as a URL decodes it.
        let query = "Signature=zJDF%2BLrzhj%2FThnlvIToysFRq6t4%3D&AccessKeyId=testId&SignName=%E9%98%BF%E9%87%8C";
        let pairs = form_pairs(query);
        assert_eq!(pairs[0].1, "zJDF+Lrzhj/ThnlvIToysFRq6t4=");
        assert_eq!(pairs[2].1, "阿里");
    }

    #[test]
    fn tencent_check_matches_the_documented_example() {
        let headers: BTreeMap<String, String> = [
            ("content-type", "application/json; charset=utf-8"),
            ("host", "cvm.tencentcloudapi.com"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let body = br#"{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}"#;
        assert_eq!(
            tc3_expected(
                "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE",
                "POST",
                "",
                &headers,
                "content-type;host",
                body,
                1_551_113_065,
                "cvm",
            ),
            "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
        );
        let parsed = parse_tc3(
            "TC3-HMAC-SHA256 Credential=AKID/2019-02-25/cvm/tc3_request, SignedHeaders=content-type;host, Signature=ab",
        )
        .expect("parses");
        assert_eq!(parsed.0, "AKID");
        assert_eq!(parsed.3, "content-type;host");
    }

    #[tokio::test]
    async fn control_routes_inject_codes_and_receipts() {
        let sandbox = Sandbox::new(crate::SandboxConfig {
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(sandbox.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let answer = http
            .post(format!("{base}/_sandbox/sms/codes"))
            .json(&json!({"provider": "aliyun_sms", "codes": ["isv.AMOUNT_NOT_ENOUGH"]}))
            .send()
            .await
            .expect("answers");
        assert_eq!(answer.status().as_u16(), 204);
        assert_eq!(
            sandbox.take_sms_code(SmsProvider::AliyunSms).as_deref(),
            Some("isv.AMOUNT_NOT_ENOUGH")
        );
        let answer = http
            .post(format!("{base}/_sandbox/sms/receipts"))
            .json(&json!({"phone": "+8613800138000",
                          "receipt": {"kind": "failed", "code": "MK:0001", "message": "x"}}))
            .send()
            .await
            .expect("answers");
        assert_eq!(answer.status().as_u16(), 204);
        assert_eq!(
            sandbox.lock().sms.receipts.get("13800138000"),
            Some(&SmsReceipt::Failed {
                code: "MK:0001".into(),
                message: "x".into()
            })
        );
        let _ = stop.send(());
        let _ = server.await;
    }

    #[test]
    fn numbers_are_compared_nationally() {
        assert_eq!(national("+8613800138000"), "13800138000");
        assert_eq!(national("13800138000"), "13800138000");
        assert_eq!(national("+85261234567"), "85261234567");
    }
}
