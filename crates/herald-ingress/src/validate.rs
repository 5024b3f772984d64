//! Structural checks of a request, each naming the field at fault. Template-level checks
//! (does the template exist, are its variables given) happen at render time.

use herald_contract::channels;
use herald_contract::v1::NotificationRequest;

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

/// The most recipients one request may name (the renderer enforces the same for AMQP).
pub const MAX_RECIPIENTS: usize = 10_000;

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
    use herald_contract::decode_json;

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
}
