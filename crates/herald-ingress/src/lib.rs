//! The ingress gateway: `POST /v1/messages` accepts a request durably (message row and outbox
//! row in one transaction, relayed to the requests exchange with a confirm) before answering
//! 202; `GET /v1/messages/{id}` shows the whole lifecycle.

mod recipients;
mod status;
mod templates;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_amqp::{AmqpSettings, Broker};
use herald_contract::v1::NotificationRequest;
use herald_contract::{SCHEMA_VERSION, canonical_bytes, decode_json, encode_json, headers};
use herald_store::{Accepted, NewMessage, OutboxMessage, Store, StoreError, StoreSettings};
use herald_telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub use herald_contract::validate::{FieldError, validate};

/// `[ingress]` in herald.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct IngressSettings {
    pub listen: String,
    pub max_body_bytes: usize,
}

impl Default for IngressSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8090".into(),
            // 10,000 recipients (the most one request may name) with directory user ids or
            // openids fit with room to spare.
            max_body_bytes: 2 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct IngressConfig {
    pub amqp: AmqpSettings,
    pub postgres: StoreSettings,
    pub telemetry: TelemetrySettings,
    pub ingress: IngressSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error(transparent)]
    Amqp(#[from] herald_amqp::AmqpError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("ingress listener: {0}")]
    Io(#[from] std::io::Error),
}

struct Ingress {
    broker: Broker,
    store: Store,
}

/// Serves the REST API on `listener` until `shutdown`.
pub async fn run(
    config: IngressConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), IngressError> {
    let broker = Broker::connect(&config.amqp, "ingress").await?;
    broker.declare_topology().await?;
    let (store, relay) = Store::open(&config.postgres, &broker, shutdown.clone()).await?;
    herald_telemetry::spawn_admin(
        &config.telemetry,
        store.ready_check(&broker),
        shutdown.clone(),
    )
    .await?;
    let state = Arc::new(Ingress {
        broker: broker.clone(),
        store,
    });
    tracing::info!(address = %listener.local_addr()?, "ingress listening");
    let served = axum::serve(listener, router(state, config.ingress.max_body_bytes))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    let _ = relay.await;
    broker.close().await;
    Ok(served?)
}

fn router(state: Arc<Ingress>, max_body_bytes: usize) -> Router {
    Router::new()
        .route(
            "/v1/messages",
            post(create_message).get(status::list_messages),
        )
        .route("/v1/messages/{id}", get(get_message))
        .route(
            "/v1/webhooks/status",
            get(status::get_webhook)
                .put(status::put_webhook)
                .delete(status::delete_webhook),
        )
        .merge(templates::routes())
        .merge(recipients::routes())
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// An error answer: `{"error": code, "field"?, "message"}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    field: Option<String>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            field: None,
            message: message.into(),
        }
    }

    fn field(field: String, message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            field: Some(field),
            message,
        }
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "try again shortly",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        (self.status, Json(body)).into_response()
    }
}

/// The tenant of the API key in `Authorization: Bearer <key>` or `X-API-Key`.
struct Tenant(String);

impl FromRequestParts<Arc<Ingress>> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<Ingress>) -> Result<Self, ApiError> {
        let key = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 9110 §11.1).
                let (scheme, key) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(key)
            })
            .or_else(|| parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "an API key is required (Authorization: Bearer <key>)",
                )
            })?;
        match state.store.tenant_for_api_key(key).await {
            Ok(Some(tenant)) => Ok(Tenant(tenant)),
            Ok(None) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown or revoked API key",
            )),
            Err(e) => Err(ApiError::internal(e)),
        }
    }
}

fn request_span(method: &str, route: &str, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = route,
        herald.tenant = tracing::field::Empty,
        herald.message_id = tracing::field::Empty,
    );
    let carrier: HashMap<String, String> = [headers::TRACEPARENT, headers::TRACESTATE]
        .iter()
        .filter_map(|name| {
            headers
                .get(*name)
                .and_then(|v| v.to_str().ok())
                .map(|v| (name.to_string(), v.to_string()))
        })
        .collect();
    herald_telemetry::set_parent_from_headers(&span, &carrier);
    span
}

async fn create_message(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // Answer a body that is too large (or unreadable) in the API's own error shape.
    let body = body.map_err(|rejection| {
        ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
    })?;
    let span = request_span("POST", "/v1/messages", &headers);
    span.record("herald.tenant", tenant.as_str());
    accept(&state, tenant, &headers, &body)
        .instrument(span)
        .await
}

async fn accept(
    state: &Ingress,
    tenant: String,
    http_headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let mut request: NotificationRequest =
        decode_json(body).map_err(|e| ApiError::field(e.field, e.message))?;
    validate(&request).map_err(|e| ApiError::field(e.field, e.message))?;
    if let Some(key) = http_headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
    {
        request.idempotency_key = key.to_string();
    }
    let id = if request.id.is_empty() {
        Uuid::now_v7()
    } else {
        Uuid::parse_str(&request.id)
            .map_err(|_| ApiError::field("id".into(), "must be a UUID".into()))?
    };
    tracing::Span::current().record("herald.message_id", tracing::field::display(id));
    // The hash covers what the producer sent, so a replay is recognised whatever id we assign.
    let request_hash = Sha256::digest(canonical_bytes(&request)).to_vec();
    request.id = id.to_string();
    request.tenant = tenant.clone();
    let body = encode_json(&request);
    let traceparent = herald_telemetry::current_traceparent();
    let mut outbox_headers = BTreeMap::from([(
        headers::SCHEMA_VERSION.to_string(),
        SCHEMA_VERSION.to_string(),
    )]);
    outbox_headers.extend(herald_telemetry::trace_headers());
    let accepted = state
        .store
        .accept_message(
            &NewMessage {
                id,
                tenant_id: tenant.clone(),
                template_id: request
                    .template
                    .as_ref()
                    .map(|t| t.id.clone())
                    .unwrap_or_default(),
                idempotency_key: Some(request.idempotency_key.clone()).filter(|k| !k.is_empty()),
                request: String::from_utf8_lossy(&body).into_owned(),
                request_hash,
                source: "rest",
                traceparent,
            },
            &OutboxMessage {
                exchange: state.broker.topology().requests_exchange(),
                routing_key: format!("request.{tenant}"),
                headers: outbox_headers,
                body,
                routing: herald_amqp::Routing::Required,
            },
        )
        .await;
    match accepted {
        Ok(Accepted::New(id)) => {
            tracing::info!("accepted");
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "id": id, "state": "accepted" })),
            )
                .into_response())
        }
        Ok(Accepted::Replay(id)) => Ok((
            StatusCode::ACCEPTED,
            [("idempotent-replayed", "true")],
            Json(json!({ "id": id, "state": "accepted" })),
        )
            .into_response()),
        Err(StoreError::IdempotencyConflict) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            "this idempotency key was used with a different request",
        )),
        Err(StoreError::IdConflict(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "id_conflict",
            "this message id was used with a different request",
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn get_message(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id =
        Uuid::parse_str(&id).map_err(|_| ApiError::field("id".into(), "must be a UUID".into()))?;
    match state.store.message_view(&tenant, id).await {
        Ok(Some(view)) => Ok(Json(view).into_response()),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no message {id}"),
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn ready(State(state): State<Arc<Ingress>>) -> Response {
    let db = state.store.ping().await.is_ok();
    let broker = state.broker.is_connected();
    let status = if db && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "postgres": db, "rabbitmq": broker }))).into_response()
}
