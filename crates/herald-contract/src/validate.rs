//! Structural checks of a request, each naming the field at fault: the ingress answers a REST
//! request that fails them with a 400, the renderer rejects an AMQP request that fails them.
//! Template-level checks (does the template exist, are its variables given) happen at render
//! time.

use crate::Timestamp;
use crate::channels;
use crate::v1::{NotificationRequest, Priority};

/// A request problem: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> Result<(), FieldError> {
    Err(FieldError {
        field: field.into(),
        message: message.into(),
    })
}

/// The most recipients one request may name.
pub const MAX_RECIPIENTS: usize = 10_000;

/// protobuf's Timestamp range, 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z: what an
/// RFC 3339 string can hold. Outside it a time has no JSON form that decodes again (an offset
/// can carry `9999-12-31T23:30:00-01:00` into year 10000, written `+10000-…`).
fn timestamp_in_range(t: &Timestamp) -> bool {
    (-62_135_596_800..=253_402_300_799).contains(&t.seconds)
        && (0..1_000_000_000).contains(&t.nanos)
}

pub fn validate(request: &NotificationRequest) -> Result<(), FieldError> {
    if !request.id.is_empty() && uuid::Uuid::parse_str(&request.id).is_err() {
        return err("id", "must be a UUID");
    }
    match &request.template {
        Some(t) if !t.id.trim().is_empty() => {}
        _ => return err("template.id", "required"),
    }
    if request.recipients.is_empty() {
        return err("recipients", "at least one recipient is required");
    }
    if request.recipients.len() > MAX_RECIPIENTS {
        return err(
            "recipients",
            format!(
                "at most {MAX_RECIPIENTS} recipients per request (got {}); split the request",
                request.recipients.len()
            ),
        );
    }
    for (index, r) in request.recipients.iter().enumerate() {
        let any = [
            &r.user_id,
            &r.wechat_openid,
            &r.email,
            &r.phone,
            &r.wecom_userid,
            &r.webhook_url,
            &r.dingtalk_robot,
            &r.feishu_robot,
            &r.wecom_robot,
        ]
        .iter()
        .any(|a| !a.is_empty());
        if !any {
            return err(
                format!("recipients[{index}]"),
                "names no user id and no address",
            );
        }
    }
    for (index, channel) in request.channels.iter().enumerate() {
        if !channels::ALL.contains(&channel.as_str()) {
            return err(
                format!("channels[{index}]"),
                format!(
                    "unknown channel `{channel}` (known: {})",
                    channels::ALL.join(", ")
                ),
            );
        }
    }
    // NaN and the infinities have no JSON form: canonical JSON of the request would fail.
    if let Some(variables) = &request.variables
        && let Err(error) = serde_json::to_writer(std::io::sink(), variables)
    {
        return err("variables", error.to_string());
    }
    if Priority::try_from(request.priority).is_err() {
        return err("priority", "unknown priority");
    }
    for (field, time) in [
        ("send_at", &request.send_at),
        ("expires_at", &request.expires_at),
    ] {
        if time.as_ref().is_some_and(|t| !timestamp_in_range(t)) {
            return err(field, "must be between years 1 and 9999 (UTC)");
        }
    }
    if let (Some(send_at), Some(expires_at)) = (&request.send_at, &request.expires_at)
        && (expires_at.seconds, expires_at.nanos) <= (send_at.seconds, send_at.nanos)
    {
        return err("expires_at", "must be after send_at");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode_json;

    fn check(body: &str) -> Result<(), FieldError> {
        validate(&decode_json::<NotificationRequest>(body.as_bytes()).expect("decodes"))
    }

    #[test]
    fn names_the_field() {
        assert_eq!(
            check(r#"{"recipients":[{"wechatOpenid":"o"}]}"#)
                .expect_err("invalid")
                .field,
            "template.id"
        );
        assert_eq!(
            check(r#"{"template":{"id":"t"}}"#)
                .expect_err("invalid")
                .field,
            "recipients"
        );
        assert_eq!(
            check(r#"{"template":{"id":"t"},"recipients":[{}]}"#)
                .expect_err("invalid")
                .field,
            "recipients[0]"
        );
        assert_eq!(
            check(r#"{"template":{"id":"t"},"recipients":[{"email":"a@b"}],"channels":["fax"]}"#)
                .expect_err("invalid")
                .field,
            "channels[0]"
        );
        assert_eq!(
            check(r#"{"id":"x","template":{"id":"t"},"recipients":[{"email":"a@b"}]}"#)
                .expect_err("invalid")
                .field,
            "id"
        );
        assert!(check(r#"{"template":{"id":"t"},"recipients":[{"wechatOpenid":"o"}]}"#).is_ok());
    }

    /// Caught by the `request_json` fuzz check (an accepted request decodes where it is
    /// published), input fuzz/corpus/request_json/crash-year-10000: an offset carried a time
    /// past 9999-12-31 UTC, which JSON cannot hold again, so the accepted request never
    /// decoded at the renderer.
    #[test]
    fn times_must_fit_rfc_3339_in_utc() {
        let at = |field: &str, time: &str| {
            check(&format!(
                r#"{{"template":{{"id":"t"}},"recipients":[{{"email":"a@b"}}],"{field}":"{time}"}}"#
            ))
        };
        for field in ["sendAt", "expiresAt"] {
            let snake = if field == "sendAt" {
                "send_at"
            } else {
                "expires_at"
            };
            assert_eq!(
                at(field, "9999-12-31T23:30:00-01:00")
                    .expect_err("year 10000")
                    .field,
                snake
            );
            assert_eq!(
                at(field, "0001-01-01T00:30:00+01:00")
                    .expect_err("year 0")
                    .field,
                snake
            );
            assert!(at(field, "9999-12-31T23:59:59.999999999Z").is_ok());
            assert!(at(field, "0001-01-01T00:00:00Z").is_ok());
        }
    }

    /// Found by the `request_proto` fuzz target (fuzz/corpus/request_proto/crash-unknown-priority): JSON refuses an
    /// unknown enum number, but a request built in code (or from protobuf) can carry one,
    /// and its canonical JSON then fails to encode.
    #[test]
    fn priority_must_be_known() {
        let mut request: NotificationRequest =
            decode_json(br#"{"template":{"id":"t"},"recipients":[{"email":"a@b"}]}"#)
                .expect("decodes");
        request.priority = 565;
        assert_eq!(validate(&request).expect_err("unknown").field, "priority");
        request.priority = Priority::Bulk as i32;
        assert!(validate(&request).is_ok());
    }

    /// Found by the `request_proto` fuzz target (fuzz/corpus/request_proto/crash-nan-variable):
    /// a number JSON cannot write made the request's canonical JSON fail to encode.
    #[test]
    fn variables_must_have_a_json_form() {
        let mut request: NotificationRequest = decode_json(
            br#"{"template":{"id":"t"},"recipients":[{"email":"a@b"}],"variables":{"n":1}}"#,
        )
        .expect("decodes");
        assert!(validate(&request).is_ok());
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let list = crate::Value::from(vec![crate::Value::from(bad)]);
            request.variables = Some(crate::Struct::from_iter([("l".to_string(), list)]));
            assert_eq!(
                validate(&request).expect_err("no JSON form").field,
                "variables"
            );
        }
    }

    #[test]
    fn timestamps_built_in_code_must_be_in_range() {
        let mut request: NotificationRequest =
            decode_json(br#"{"template":{"id":"t"},"recipients":[{"email":"a@b"}]}"#)
                .expect("decodes");
        for (seconds, nanos) in [(i64::MAX, 0), (0, -1), (0, 1_000_000_000)] {
            request.send_at = Some(Timestamp { seconds, nanos });
            assert_eq!(
                validate(&request).expect_err("out of range").field,
                "send_at"
            );
        }
    }
}
