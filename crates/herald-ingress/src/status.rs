//! The status API's look-up (`GET /v1/messages?…`) and the tenant's status webhook
//! (`PUT`/`GET`/`DELETE /v1/webhooks/status`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use herald_store::{MessageFilter, new_webhook_secret};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::{ApiError, Ingress, Tenant};

/// Page size when `limit` is absent, and the largest allowed.
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 200;

/// Message states a filter may name.
const STATES: &[&str] = &[
    "accepted",
    "rejected",
    "queued",
    "sending",
    "sent",
    "delivered",
    "retrying",
    "deferred",
    "suppressed",
    "failed",
    "expired",
    "cancelled",
];

fn field_error(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::field(field.to_string(), message.into())
}

/// The opaque cursor: the (created_at, id) of the last message of the previous page.
fn encode_cursor(created_at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{id}", created_at.timestamp_micros()))
}

fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
    let (micros, id) = text.split_once('.')?;
    Some((
        DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        Uuid::parse_str(id).ok()?,
    ))
}

/// `GET /v1/messages?recipient=&template=&since=&state=&limit=&cursor=`: the tenant's
/// messages, newest first, `limit` per page; `next_cursor` fetches the next page.
pub(crate) async fn list_messages(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let mut filter = MessageFilter {
        limit: DEFAULT_LIMIT,
        ..Default::default()
    };
    for (name, value) in &query {
        let value = value.trim();
        let set = (!value.is_empty()).then(|| value.to_string());
        match name.as_str() {
            "recipient" => filter.recipient = set,
            "template" => filter.template = set,
            "state" => {
                if let Some(s) = &set
                    && !STATES.contains(&s.as_str())
                {
                    return Err(field_error(
                        "state",
                        format!("unknown state `{s}` (known: {})", STATES.join(", ")),
                    ));
                }
                filter.state = set;
            }
            "since" => {
                filter.since = set
                    .map(|s| {
                        DateTime::parse_from_rfc3339(&s)
                            .map(|t| t.with_timezone(&Utc))
                            .map_err(|_| field_error("since", "must be an RFC 3339 time"))
                    })
                    .transpose()?;
            }
            "limit" => {
                if let Some(s) = set {
                    filter.limit = s
                        .parse::<i64>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| field_error("limit", format!("must be 1 to {MAX_LIMIT}")))?;
                }
            }
            "cursor" => {
                filter.after = set
                    .map(|c| {
                        decode_cursor(&c)
                            .ok_or_else(|| field_error("cursor", "not a cursor this API gave out"))
                    })
                    .transpose()?;
            }
            other => {
                return Err(field_error(
                    other,
                    "unknown parameter (known: recipient, template, since, state, limit, cursor)",
                ));
            }
        }
    }
    let page = filter.limit;
    // One more than the page tells whether there is a next page.
    filter.limit = page + 1;
    let mut messages = state
        .store
        .list_messages(&tenant, &filter)
        .await
        .map_err(ApiError::internal)?;
    let next_cursor = if messages.len() as i64 > page {
        messages.truncate(usize::try_from(page).unwrap_or(0));
        messages.last().map(|m| encode_cursor(m.created_at, m.id))
    } else {
        None
    };
    Ok(Json(json!({ "messages": messages, "next_cursor": next_cursor })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookRequest {
    url: String,
    /// Optional: a `whsec_<base64>` secret of your own; otherwise Herald makes one.
    #[serde(default)]
    secret: Option<String>,
}

/// `PUT /v1/webhooks/status` `{"url": "https://…", "secret"?: "whsec_…"}`: sets the tenant's
/// status webhook and answers it with its secret (the only time the secret is shown).
pub(crate) async fn put_webhook(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: WebhookRequest =
        herald_contract::decode_json(&body).map_err(|e| ApiError::field(e.field, e.message))?;
    let url = request.url.trim();
    // The dispatcher checks where the host resolves to (SSRF) at every send.
    let authority = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .and_then(|rest| rest.split(['/', '?', '#']).next())
        .unwrap_or_default();
    if authority.is_empty() || url.chars().any(char::is_whitespace) {
        return Err(field_error("url", "must be an http(s) URL with a host"));
    }
    let secret = match request.secret {
        Some(secret) => {
            // The one parser the status webhook dispatcher signs with.
            let key_len = secret
                .starts_with("whsec_")
                .then(|| herald_webhook::Secret::parse(&secret).ok())
                .flatten()
                .map_or(0, |key| key.key().len());
            if key_len < 24 {
                return Err(field_error(
                    "secret",
                    "must be `whsec_` and the base64 of at least 24 random bytes",
                ));
            }
            secret
        }
        None => new_webhook_secret(),
    };
    let webhook = state
        .store
        .set_tenant_webhook(&tenant, url, &secret)
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(%tenant, "status webhook set");
    Ok(Json(json!({
        "url": webhook.url,
        "secret": webhook.secret,
        "enabled": webhook.enabled,
        "updated_at": webhook.updated_at,
    }))
    .into_response())
}

/// `GET /v1/webhooks/status`: the tenant's status webhook (without its secret).
pub(crate) async fn get_webhook(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
) -> Result<Response, ApiError> {
    match state.store.tenant_webhook(&tenant).await {
        Ok(Some(webhook)) => Ok(Json(json!({
            "url": webhook.url,
            "enabled": webhook.enabled,
            "created_at": webhook.created_at,
            "updated_at": webhook.updated_at,
        }))
        .into_response()),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no status webhook is set",
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// `DELETE /v1/webhooks/status`.
pub(crate) async fn delete_webhook(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
) -> Result<Response, ApiError> {
    match state.store.delete_tenant_webhook(&tenant).await {
        Ok(true) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(false) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no status webhook is set",
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).expect("time");
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)), Some((at, id)));
        assert_eq!(decode_cursor("nope"), None);
        assert_eq!(decode_cursor(""), None);
    }
}
