//! The recipient directory (`/v1/recipients`), the tenant's default preferences
//! (`/v1/preferences`) and cancelling a message (`POST /v1/messages/{id}/cancel`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald_contract::decode_json;
use herald_store::{Preferences, RecipientProfile};
use serde_json::json;
use uuid::Uuid;

use crate::{ApiError, Ingress, Tenant};

/// Page size of `GET /v1/recipients` when `limit` is absent, and the largest allowed.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

pub(crate) fn routes() -> Router<Arc<Ingress>> {
    Router::new()
        .route("/v1/recipients", get(list))
        .route(
            "/v1/recipients/{user_id}",
            get(get_recipient)
                .put(put_recipient)
                .delete(delete_recipient),
        )
        .route("/v1/preferences", get(get_preferences).put(put_preferences))
        .route("/v1/messages/{id}/cancel", post(cancel))
}

fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
    })
}

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
}

/// `PUT /v1/recipients/{user_id}`: create or replace; `201` when new, `200` when replaced.
async fn put_recipient(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    Path(user_id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(raw)?;
    let mut profile: RecipientProfile =
        decode_json(&raw).map_err(|e| ApiError::field(e.field, e.message))?;
    if !profile.user_id.is_empty() && profile.user_id != user_id {
        return Err(ApiError::field(
            "user_id".into(),
            "differs from the user id in the path".into(),
        ));
    }
    profile.user_id = user_id;
    profile
        .validate()
        .map_err(|(field, message)| ApiError::field(field, message))?;
    let created = state
        .store
        .put_recipient(&tenant, &profile)
        .await
        .map_err(ApiError::internal)?;
    tracing::info!(user_id = %profile.user_id, created, "recipient stored");
    let stored = state
        .store
        .recipient(&tenant, &profile.user_id)
        .await
        .map_err(ApiError::internal)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(stored)).into_response())
}

async fn get_recipient(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    Path(user_id): Path<String>,
) -> Result<Response, ApiError> {
    match state.store.recipient(&tenant, &user_id).await {
        Ok(Some(profile)) => Ok(Json(profile).into_response()),
        Ok(None) => Err(not_found(format!("no recipient `{user_id}`"))),
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn delete_recipient(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    Path(user_id): Path<String>,
) -> Result<Response, ApiError> {
    match state.store.delete_recipient(&tenant, &user_id).await {
        Ok(true) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(false) => Err(not_found(format!("no recipient `{user_id}`"))),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// `GET /v1/recipients?limit=&after=`: the directory in user id order; `next_after` fetches
/// the next page.
async fn list(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| ApiError::field("limit".into(), format!("must be 1 to {MAX_LIMIT}")))?,
    };
    let after = query
        .get("after")
        .map(String::as_str)
        .filter(|a| !a.is_empty());
    let page = state
        .store
        .list_recipients(&tenant, after, limit)
        .await
        .map_err(ApiError::internal)?;
    let next_after = (page.len() as i64 == limit)
        .then(|| page.last().map(|p| p.user_id.clone()))
        .flatten();
    Ok(Json(json!({ "recipients": page, "next_after": next_after })).into_response())
}

async fn get_preferences(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
) -> Result<Response, ApiError> {
    let preferences = state
        .store
        .tenant_preferences(&tenant)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(preferences).into_response())
}

/// `PUT /v1/preferences`: the tenant's defaults, which recipients' own override field by
/// field.
async fn put_preferences(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(raw)?;
    let preferences: Preferences =
        decode_json(&raw).map_err(|e| ApiError::field(e.field, e.message))?;
    preferences
        .validate("preferences")
        .map_err(|(field, message)| ApiError::field(field, message))?;
    state
        .store
        .put_tenant_preferences(&tenant, &preferences)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(preferences).into_response())
}

/// `POST /v1/messages/{id}/cancel`: pending deliveries end as `expired` with error code
/// `cancelled`; nothing more is rendered for the message.
async fn cancel(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id =
        Uuid::parse_str(&id).map_err(|_| ApiError::field("id".into(), "must be a UUID".into()))?;
    match state.store.cancel_message(&tenant, id).await {
        Ok(Some(cancellation)) => {
            tracing::info!(
                message_id = %id,
                cancelled = cancellation.cancelled,
                "message cancelled"
            );
            Ok(Json(cancellation).into_response())
        }
        Ok(None) => Err(not_found(format!("no message {id}"))),
        Err(e) => Err(ApiError::internal(e)),
    }
}
