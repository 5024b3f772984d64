//! The contract between producers and Herald's services.
//!
//! Types come from `proto/herald/v1/herald.proto`; on AMQP a body is the canonical proto3 JSON
//! of one of them. [`decode_json`] names the offending field on failure so ingress can answer a
//! 400 that says what to fix, and consumers can dead-letter with the same reason.

pub mod validate;

pub mod v1 {
    #![allow(clippy::all, clippy::unwrap_used)]
    include!(concat!(env!("OUT_DIR"), "/herald.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/herald.v1.serde.rs"));
}

pub use pbjson_types::{Struct, Timestamp, Value};

/// AMQP header names Herald reads and writes.
pub mod headers {
    /// Version of the body schema; bumped on incompatible changes.
    pub const SCHEMA_VERSION: &str = "x-herald-schema";
    /// 1-based attempt count of a delivery job.
    pub const ATTEMPT: &str = "x-herald-attempt";
    /// Why a message was dead-lettered (machine readable, e.g. `decode_error`).
    pub const DEAD_REASON: &str = "x-herald-dead-reason";
    /// Human-readable detail for the dead-letter reason.
    pub const DEAD_DETAIL: &str = "x-herald-dead-detail";
    /// The `user_id` property of a message Herald republished (it cannot keep the property).
    pub const ORIGINAL_USER: &str = "x-herald-original-user";
    /// Queue the dead-lettered message was consumed from.
    pub const DEAD_QUEUE: &str = "x-herald-dead-queue";
    /// When Herald parked the message (Unix milliseconds).
    pub const DEAD_AT: &str = "x-herald-dead-at";
    /// A deferred delivery job is not tried before this (Unix milliseconds).
    pub const DEFER_UNTIL: &str = "x-herald-defer-until";
    /// When Herald published the message (ms since the epoch), for queue-lag metrics.
    pub const PUBLISHED_AT: &str = "x-herald-published-at";
    /// On a retried job: the `traceparent` of the attempt that failed, linked from the next.
    pub const RETRY_OF: &str = "x-herald-retry-of";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
}

/// Current schema version written in [`headers::SCHEMA_VERSION`].
pub const SCHEMA_VERSION: &str = "herald.v1";

/// Channel names; each is also the routing key on the deliveries exchange.
pub mod channels {
    pub const WECHAT_TEMPLATE: &str = "wechat.template";
    /// Subscribe messages (Official Account `bizsend`, mini program `subscribe/send`).
    pub const WECHAT_SUBSCRIBE: &str = "wechat.subscribe";
    /// WeCom (企业微信) application messages.
    pub const WECOM: &str = "wecom";
    /// WeCom group robots (群机器人): text and markdown from the `wecom` template variant.
    pub const WECOM_ROBOT: &str = "wecom.robot";
    /// DingTalk custom group robots.
    pub const DINGTALK: &str = "dingtalk";
    /// Feishu (Lark) custom group robots.
    pub const FEISHU: &str = "feishu";
    /// E-mail over SMTP.
    pub const EMAIL: &str = "email";
    /// Signed HTTP POSTs (Standard Webhooks) to the recipient's `webhook_url`.
    pub const WEBHOOK: &str = "webhook";
    /// SMS through Tencent Cloud SMS or Aliyun SMS (the provider account's configuration
    /// picks which), to the recipient's `phone`.
    pub const SMS: &str = "sms";
    /// Every channel this build knows how to route (and sends to).
    pub const ALL: &[&str] = &[
        WECHAT_TEMPLATE,
        WECHAT_SUBSCRIBE,
        WECOM,
        WECOM_ROBOT,
        DINGTALK,
        FEISHU,
        EMAIL,
        WEBHOOK,
        SMS,
    ];
}

/// A body that could not be decoded, with the path of the field at fault.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DecodeError {
    /// Dotted path of the offending field (`recipients[0].wechat_openid`), or `body`.
    pub field: String,
    pub message: String,
}

/// Decodes canonical JSON, reporting the path of the first offending field.
pub fn decode_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => {
            de.end().map_err(|e| DecodeError {
                field: "body".into(),
                message: e.to_string(),
            })?;
            Ok(value)
        }
        Err(err) => {
            let path = err.path().to_string();
            let field = if path == "." || path == "?" || path.is_empty() {
                "body".to_string()
            } else {
                path
            };
            Err(DecodeError {
                field,
                message: err.into_inner().to_string(),
            })
        }
    }
}

/// A digest-ready canonical form: object keys sorted, so equal messages give equal bytes
/// (maps such as `variables` and `metadata` have no order of their own).
pub fn canonical_bytes<T: serde::Serialize>(message: &T) -> Vec<u8> {
    serde_json::to_value(message)
        .and_then(|value| serde_json::to_vec(&value))
        .unwrap_or_default()
}

/// Encodes a contract message as canonical JSON.
pub fn encode_json<T: serde::Serialize>(message: &T) -> Vec<u8> {
    // Serialising generated types into a Vec cannot fail: no maps with non-string keys, no I/O.
    serde_json::to_vec(message).unwrap_or_default()
}

impl v1::Priority {
    /// AMQP message priority (0-9) for the lane; unspecified counts as normal.
    pub fn amqp_priority(self) -> u8 {
        match self {
            v1::Priority::Urgent => 9,
            v1::Priority::High => 6,
            v1::Priority::Normal | v1::Priority::Unspecified => 3,
            v1::Priority::Bulk => 0,
        }
    }
}

impl v1::DeliveryJob {
    /// The first step of this job's fallback chain as a job of its own (attempt 1), carrying
    /// the rest of the chain; `None` at the end of the chain.
    pub fn fallback_job(&self) -> Option<v1::DeliveryJob> {
        let (next, rest) = self.fallback.split_first()?;
        Some(v1::DeliveryJob {
            delivery_id: next.delivery_id.clone(),
            channel: next.channel.clone(),
            provider_account: next.provider_account.clone(),
            recipient: next.recipient.clone(),
            payload: next.payload.clone(),
            attempt: 1,
            fallback: rest.to_vec(),
            ..self.clone()
        })
    }
}

impl v1::DeliveryState {
    /// The lower-case name used in routing keys, the database and the REST API.
    pub fn name(self) -> &'static str {
        use v1::DeliveryState as S;
        match self {
            S::Unspecified => "unspecified",
            S::Queued => "queued",
            S::Sending => "sending",
            S::Sent => "sent",
            S::Delivered => "delivered",
            S::Retrying => "retrying",
            S::Deferred => "deferred",
            S::Suppressed => "suppressed",
            S::Failed => "failed",
            S::Expired => "expired",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        use v1::DeliveryState as S;
        [
            S::Queued,
            S::Sending,
            S::Sent,
            S::Delivered,
            S::Retrying,
            S::Deferred,
            S::Suppressed,
            S::Failed,
            S::Expired,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::v1::*;
    use super::*;

    #[test]
    fn request_round_trips_through_canonical_json() {
        let body = br#"{
            "id": "0193a9c2-7a4e-7cc0-9c1e-2f4d7c0b1a11",
            "template": {"id": "order_shipped", "locale": "zh_CN"},
            "variables": {"order_id": "A-1", "items": 3},
            "recipients": [{"wechatOpenid": "oAbCdEfGhIjKlMnOpQrStUvWxYz0"}],
            "channels": ["wechat.template"],
            "priority": "PRIORITY_HIGH",
            "sendAt": "2026-11-23T10:00:00Z",
            "metadata": {"order": "A-1"}
        }"#;
        let request: NotificationRequest = decode_json(body).expect("decodes");
        assert_eq!(
            request.template.as_ref().map(|t| t.id.as_str()),
            Some("order_shipped")
        );
        assert_eq!(request.priority(), Priority::High);
        assert_eq!(
            request.recipients[0].wechat_openid,
            "oAbCdEfGhIjKlMnOpQrStUvWxYz0"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&encode_json(&request)).expect("encodes");
        assert_eq!(json["priority"], "PRIORITY_HIGH");
        // pbjson-types writes the offset as "+00:00" (RFC 3339, though protobuf's canonical form is "Z").
        let send_at = json["sendAt"].as_str().unwrap_or_default();
        assert!(send_at.starts_with("2026-11-23T10:00:00"), "{send_at}");
        assert_eq!(json["variables"]["items"], 3.0);
        // Field names may also be given in their proto spelling.
        let snake: NotificationRequest =
            decode_json(br#"{"recipients":[{"wechat_openid":"x"}]}"#).expect("snake case");
        assert_eq!(snake.recipients[0].wechat_openid, "x");
    }

    #[test]
    fn decode_errors_name_the_field() {
        let err = decode_json::<NotificationRequest>(br#"{"recipients":[{"email": 5}]}"#)
            .expect_err("email must be a string");
        assert_eq!(err.field, "recipients[0].email");
        let err = decode_json::<NotificationRequest>(br#"{"priority":"PRIORITY_SOON"}"#)
            .expect_err("unknown enum value");
        assert_eq!(err.field, "priority");
        let err = decode_json::<NotificationRequest>(b"not json").expect_err("not json");
        assert_eq!(err.field, "body");
    }

    #[test]
    fn state_names_round_trip() {
        for state in [
            DeliveryState::Queued,
            DeliveryState::Delivered,
            DeliveryState::Failed,
        ] {
            assert_eq!(DeliveryState::from_name(state.name()), Some(state));
        }
    }
}
