//! SMS delivery receipts: Tencent Cloud's status callback (回执) and Aliyun's SmsReport HTTP
//! batch push, parsed and normalised into the `DeliveryEvent`s the status projector applies.
//!
//! Neither provider signs its pushes, so the receiver authenticates them with a secret of the
//! account's own, configured in the callback URL registered in the provider's console
//! (`…/v1/callbacks/sms/<account>?token=<secret>`) or sent as the password of HTTP Basic
//! authentication. Nothing here authenticates: the receiver does before a body reaches
//! [`normalise`].

use chrono::{FixedOffset, NaiveDateTime, TimeZone};
use herald_contract::Timestamp;
use herald_contract::v1::{DeliveryEvent, DeliveryState};
use serde::{Deserialize, Serialize};

use crate::wechat::Normalised;

/// Which provider's receipts an account receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmsReceiptProvider {
    TencentSms,
    AliyunSms,
}

impl SmsReceiptProvider {
    pub fn label(self) -> &'static str {
        match self {
            SmsReceiptProvider::TencentSms => "tencent_sms",
            SmsReceiptProvider::AliyunSms => "aliyun_sms",
        }
    }

    /// What the provider wants to read back once the receipts are taken.
    pub fn ack(self) -> &'static str {
        match self {
            SmsReceiptProvider::TencentSms => r#"{"result":0,"errmsg":"OK"}"#,
            SmsReceiptProvider::AliyunSms => r#"{"code":0,"msg":"接收成功"}"#,
        }
    }
}

/// The event kind of a receipt (also the `kind` of its `DeliveryEvent`).
pub const RECEIPT_KIND: &str = "sms_report";

/// One Tencent receipt.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TencentReceipt {
    #[serde(default)]
    pub user_receive_time: String,
    #[serde(default)]
    pub nationcode: String,
    #[serde(default)]
    pub mobile: String,
    /// `SUCCESS` or `FAIL`.
    #[serde(default)]
    pub report_status: String,
    /// `DELIVRD`, or the carrier's failure code.
    #[serde(default)]
    pub errmsg: String,
    #[serde(default)]
    pub description: String,
    /// The `SerialNo` of the send.
    #[serde(default)]
    pub sid: String,
}

/// One Aliyun SmsReport item.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AliyunReceipt {
    #[serde(default)]
    pub phone_number: String,
    #[serde(default)]
    pub send_time: String,
    #[serde(default)]
    pub report_time: String,
    #[serde(default)]
    pub success: bool,
    /// `DELIVERED`, or the carrier's failure code.
    #[serde(default)]
    pub err_code: String,
    #[serde(default)]
    pub err_msg: String,
    /// The `BizId` of the send.
    #[serde(default)]
    pub biz_id: String,
    /// The `OutId` of the send (Herald's delivery id).
    #[serde(default)]
    pub out_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("malformed receipt JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Both providers write times in Beijing time (`2026-11-23 10:15:00`).
fn beijing_time(text: &str) -> Option<Timestamp> {
    let naive = NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%d %H:%M:%S").ok()?;
    let offset = FixedOffset::east_opt(8 * 3600)?;
    let at = offset.from_local_datetime(&naive).single()?;
    Some(Timestamp {
        seconds: at.timestamp(),
        nanos: 0,
    })
}

fn event(
    provider: SmsReceiptProvider,
    account: &str,
    msgid: &str,
    delivered: bool,
    status: String,
    occurred_at: Option<Timestamp>,
) -> Normalised {
    let provider = provider.label();
    Normalised::Delivery(DeliveryEvent {
        // A receipt pushed again (the provider retries) gets the same id.
        event_id: format!("{provider}:{account}:{msgid}:{RECEIPT_KIND}"),
        provider: provider.into(),
        provider_account: account.into(),
        provider_msgid: msgid.into(),
        state: if delivered {
            DeliveryState::Delivered
        } else {
            DeliveryState::Failed
        } as i32,
        provider_status: status,
        kind: RECEIPT_KIND.into(),
        occurred_at,
    })
}

/// The events of an authenticated receipt push (a JSON array; one object is taken as a
/// one-item array). Items without a message id are skipped.
pub fn normalise(
    provider: SmsReceiptProvider,
    account: &str,
    body: &[u8],
) -> Result<Vec<Normalised>, ReceiptError> {
    let mut value: serde_json::Value = serde_json::from_slice(body)?;
    if value.is_object() {
        value = serde_json::Value::Array(vec![value]);
    }
    Ok(match provider {
        SmsReceiptProvider::TencentSms => {
            let items: Vec<TencentReceipt> = serde_json::from_value(value)?;
            items
                .into_iter()
                .filter(|r| !r.sid.is_empty())
                .map(|r| {
                    let delivered = r.report_status.eq_ignore_ascii_case("SUCCESS");
                    let status = if delivered || r.description.is_empty() {
                        r.errmsg.clone()
                    } else {
                        format!("{}: {}", r.errmsg, r.description)
                    };
                    event(
                        provider,
                        account,
                        &r.sid,
                        delivered,
                        status,
                        beijing_time(&r.user_receive_time),
                    )
                })
                .collect()
        }
        SmsReceiptProvider::AliyunSms => {
            let items: Vec<AliyunReceipt> = serde_json::from_value(value)?;
            items
                .into_iter()
                .filter(|r| !r.biz_id.is_empty())
                .map(|r| {
                    let status = if r.success || r.err_msg.is_empty() {
                        r.err_code.clone()
                    } else {
                        format!("{}: {}", r.err_code, r.err_msg)
                    };
                    event(
                        provider,
                        account,
                        &r.biz_id,
                        r.success,
                        status,
                        beijing_time(&r.report_time),
                    )
                })
                .collect()
        }
    })
}

/// Constant-time equality of two secrets (their lengths are not secret).
pub fn secret_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    !a.is_empty()
        && a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(event: &Normalised) -> &DeliveryEvent {
        match event {
            Normalised::Delivery(e) => e,
            other => panic!("not a delivery event: {other:?}"),
        }
    }

    #[test]
    fn tencent_receipts_as_documented() {
        // The documented sample, plus a failure.
        let body = r#"[{"user_receive_time": "2015-10-17 08:03:04", "nationcode": "86",
            "mobile": "13xxxxxxxxx", "report_status": "SUCCESS", "errmsg": "DELIVRD",
            "description": "用户短信送达成功", "sid": "xxxxxxx"},
            {"user_receive_time": "2015-10-17 08:03:05", "nationcode": "86",
            "mobile": "13xxxxxxxxx", "report_status": "FAIL", "errmsg": "MK:0001",
            "description": "用户手机号码停机", "sid": "yyyyyyy"}]"#;
        let events =
            normalise(SmsReceiptProvider::TencentSms, "acc", body.as_bytes()).expect("parses");
        assert_eq!(events.len(), 2);
        let ok = delivery(&events[0]);
        assert_eq!(ok.provider_msgid, "xxxxxxx");
        assert_eq!(ok.state(), DeliveryState::Delivered);
        assert_eq!(ok.provider_status, "DELIVRD");
        assert_eq!(ok.event_id, "tencent_sms:acc:xxxxxxx:sms_report");
        // 08:03:04 in Beijing is 00:03:04 UTC.
        assert_eq!(ok.occurred_at.map(|t| t.seconds), Some(1_445_040_184));
        let failed = delivery(&events[1]);
        assert_eq!(failed.state(), DeliveryState::Failed);
        assert_eq!(failed.provider_status, "MK:0001: 用户手机号码停机");
    }

    #[test]
    fn aliyun_receipts_as_documented() {
        let body = r#"[{"phone_number": "1381111****", "send_time": "2017-01-01 00:00:00",
            "report_time": "2017-01-01 00:00:00", "success": true, "err_code": "DELIVERED",
            "err_msg": "用户接收成功", "sms_size": "1", "biz_id": "12345********", "out_id": "67890**"},
            {"phone_number": "1381111****", "success": false, "err_code": "IC:0001",
            "err_msg": "失败", "biz_id": "2"}, {"success": true}]"#;
        let events =
            normalise(SmsReceiptProvider::AliyunSms, "acc", body.as_bytes()).expect("parses");
        assert_eq!(events.len(), 2, "the item without biz_id is skipped");
        assert_eq!(delivery(&events[0]).state(), DeliveryState::Delivered);
        assert_eq!(delivery(&events[0]).provider_msgid, "12345********");
        assert_eq!(delivery(&events[1]).state(), DeliveryState::Failed);
        assert_eq!(delivery(&events[1]).provider_status, "IC:0001: 失败");
        assert!(normalise(SmsReceiptProvider::AliyunSms, "acc", b"nope").is_err());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(secret_matches("abc", "abc"));
        assert!(!secret_matches("abc", "abd"));
        assert!(!secret_matches("abc", "ab"));
        assert!(!secret_matches("", ""));
    }
}
