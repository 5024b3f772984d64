//! Template admin for a tenant: create a version (the YAML file, or the same as JSON), list,
//! get with every version, publish (move the pointer, announced to the renderers), preview
//! (render every channel from sample data).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_renderer::template::ControlMessage;
use herald_renderer::{CompiledTemplate, RenderError, TemplateDefinition};
use herald_store::{OutboxMessage, VersionCreated};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{ApiError, Ingress, Tenant};

pub(crate) fn routes() -> Router<Arc<Ingress>> {
    Router::new()
        .route("/v1/templates", post(create).get(list))
        .route("/v1/templates/{id}", get(get_template))
        .route("/v1/templates/{id}/publish", post(publish))
        .route("/v1/templates/{id}/preview", post(preview))
}

fn invalid(error: RenderError) -> ApiError {
    ApiError::field(error.field, error.message)
}

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
    })
}

/// A JSON body (empty means `{}`), with field-level errors.
fn decode<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    herald_contract::decode_json(body).map_err(|e| ApiError::field(e.field, e.message))
}

#[derive(Debug, Default, Deserialize)]
struct CreateParams {
    /// Validate and preview only; store nothing.
    #[serde(default)]
    dry_run: bool,
}

/// `POST /v1/templates`: validates the definition and stores it as a new version (not yet
/// published). A definition equal to the latest version stores nothing (`200`, `created:
/// false`), which is what makes `heraldctl templates apply` idempotent. With `?dry_run=true`
/// nothing is stored: the answer says whether a version would be created and previews it.
async fn create(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    params: Result<Query<CreateParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::field("dry_run".into(), e.body_text()))?;
    let body = body_bytes(body)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::field("body".into(), "must be UTF-8 YAML or JSON".into()))?;
    let definition = TemplateDefinition::from_yaml(text).map_err(invalid)?;
    definition.validate().map_err(invalid)?;
    if params.dry_run {
        return dry_run(&state, &tenant, definition).await;
    }
    let created = state
        .store
        .create_template_version(&tenant, &definition.id, &definition.to_json())
        .await
        .map_err(ApiError::internal)?;
    let published = state
        .store
        .template(&tenant, &definition.id, None)
        .await
        .map_err(ApiError::internal)?
        .map(|t| t.version);
    let (status, is_new) = match created {
        VersionCreated::New(version) => {
            tracing::info!(%tenant, template = %definition.id, version, "template version created");
            (StatusCode::CREATED, true)
        }
        VersionCreated::Unchanged(_) => (StatusCode::OK, false),
    };
    Ok((
        status,
        Json(json!({
            "id": definition.id,
            "version": created.version(),
            "created": is_new,
            "published_version": published,
        })),
    )
        .into_response())
}

async fn dry_run(
    state: &Ingress,
    tenant: &str,
    definition: TemplateDefinition,
) -> Result<Response, ApiError> {
    let history = state
        .store
        .template_history(tenant, &definition.id)
        .await
        .map_err(ApiError::internal)?;
    let latest = history.as_ref().and_then(|h| h.versions.first());
    let would_create = latest.is_none_or(|v| v.definition != definition.to_json());
    let template = CompiledTemplate::compile(definition, 0).map_err(invalid)?;
    let variables = template.definition.sample_variables();
    let channels = preview_channels(state, tenant, &template, "", &variables).await?;
    Ok(Json(json!({
        "id": template.definition.id,
        "dry_run": true,
        "would_create": would_create,
        "latest_version": latest.map(|v| v.version),
        "published_version": history.and_then(|h| h.published_version),
        "channels": channels,
    }))
    .into_response())
}

/// `GET /v1/templates`.
async fn list(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
) -> Result<Response, ApiError> {
    let templates = state
        .store
        .list_templates(&tenant)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({ "templates": templates })).into_response())
}

/// `GET /v1/templates/{id}`: the template with every version, newest first.
async fn get_template(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.store.template_history(&tenant, &id).await {
        Ok(Some(history)) => Ok(Json(history).into_response()),
        Ok(None) => Err(not_found(format!("no template {id}"))),
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    version: Option<i32>,
}

/// `POST /v1/templates/{id}/publish` with `{"version": n}`: new requests without a pinned
/// version render `n` from now on (renderers drop their cached copy when the announcement,
/// written in the same transaction, reaches them).
async fn publish(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: PublishBody = decode(&body_bytes(body)?)?;
    let version = body
        .version
        .filter(|v| *v > 0)
        .ok_or_else(|| ApiError::field("version".into(), "required: a version number".into()))?;
    let announcement = ControlMessage::TemplatePublished {
        tenant: tenant.clone(),
        template: id.clone(),
        version,
    };
    let outbox = OutboxMessage {
        exchange: state.broker.topology().control_exchange(),
        routing_key: ControlMessage::ROUTING_KEY.into(),
        headers: herald_telemetry::trace_headers().into_iter().collect(),
        body: serde_json::to_vec(&announcement).unwrap_or_default(),
        // No renderer running is fine: a renderer that starts later has nothing cached.
        routing: herald_amqp::Routing::Optional,
    };
    match state
        .store
        .publish_template_version(&tenant, &id, version, Some(&outbox))
        .await
    {
        Ok(Some(changed)) => {
            if changed {
                tracing::info!(%tenant, template = %id, version, "template published");
            }
            Ok(
                Json(json!({ "id": id, "published_version": version, "changed": changed }))
                    .into_response(),
            )
        }
        Ok(None) => Err(not_found(format!("template {id} has no version {version}"))),
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewBody {
    /// The version to render; the published one when absent.
    version: Option<i32>,
    #[serde(default)]
    locale: String,
    /// Values over the template's examples.
    #[serde(default)]
    variables: Map<String, Value>,
}

/// `POST /v1/templates/{id}/preview`: every channel's payload, rendered from the variables'
/// examples (overridden by `variables`), each the body its provider API takes; a channel
/// that does not render shows its error instead.
async fn preview(
    State(state): State<Arc<Ingress>>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: PreviewBody = decode(&body_bytes(body)?)?;
    let record = state
        .store
        .template(&tenant, &id, body.version)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            not_found(match body.version {
                Some(v) => format!("template {id} has no version {v}"),
                None => format!("no published template {id}"),
            })
        })?;
    let template = TemplateDefinition::from_json(record.definition)
        .and_then(|definition| CompiledTemplate::compile(definition, record.version))
        .map_err(invalid)?;
    let mut variables = template.definition.sample_variables();
    variables.extend(body.variables);
    let channels = preview_channels(&state, &tenant, &template, &body.locale, &variables).await?;
    Ok(Json(json!({
        "id": id,
        "version": record.version,
        "locale": body.locale,
        "variables": variables,
        "channels": channels,
    }))
    .into_response())
}

/// Every channel's payload, or its error.
async fn preview_channels(
    state: &Ingress,
    tenant: &str,
    template: &CompiledTemplate,
    locale: &str,
    variables: &Map<String, Value>,
) -> Result<Map<String, Value>, ApiError> {
    // The tenant's default account per channel picks the provider template id, if the
    // variant has one for it; else the variant's first account.
    let mut defaults = HashMap::new();
    for channel in template.definition.channel_names() {
        let account = state
            .store
            .default_provider_account(tenant, channel)
            .await
            .map_err(ApiError::internal)?;
        defaults.insert(channel, account);
    }
    let rendered = template.preview(locale, variables, |channel, accounts| {
        defaults
            .get(channel)
            .cloned()
            .flatten()
            .filter(|a| accounts.contains(&a.as_str()))
            .or_else(|| accounts.first().map(|a| a.to_string()))
            .unwrap_or_default()
    });
    let channels: Map<String, Value> = rendered
        .into_iter()
        .map(|(channel, result)| {
            let value = match result {
                Ok(payload) => json!({ "payload": payload }),
                Err(e) => json!({ "error": { "field": e.field, "message": e.message } }),
            };
            (channel.to_string(), value)
        })
        .collect();
    Ok(channels)
}
