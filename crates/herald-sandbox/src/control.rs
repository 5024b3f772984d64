//! `/_sandbox/*`: the same controls as [`Sandbox`]'s methods, over HTTP, for the dev stack and
//! out-of-process tests. Not recorded in the request log.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::{AcceptedSend, CallbackAttempt, LoggedRequest, Sandbox, SandboxApp, TokenCalls};

pub(crate) fn routes() -> Router<Sandbox> {
    Router::new()
        .route(
            "/_sandbox/requests",
            get(list_requests).delete(clear_requests),
        )
        .route("/_sandbox/errors", post(inject_errors))
        .route("/_sandbox/faults", post(crate::faults::inject))
        .route("/_sandbox/apps", post(add_app))
        .route("/_sandbox/callback-status", post(set_callback_status))
        .route("/_sandbox/subscriptions", post(grant_subscription))
        .route("/_sandbox/callbacks", get(list_callbacks))
        .route("/_sandbox/sends", get(list_sends))
        .route("/_sandbox/tokens/invalidate", post(invalidate_tokens))
        .route("/_sandbox/tokens/expire", post(expire_tokens))
        .route("/_sandbox/tokens/calls", get(token_calls))
}

/// `GET /_sandbox/requests[?path=/cgi-bin/...]`
async fn list_requests(
    State(sandbox): State<Sandbox>,
    Query(query): Query<HashMap<String, String>>,
) -> Json<Vec<LoggedRequest>> {
    let requests = match query.get("path") {
        Some(path) => sandbox.lock().requests.matching(path),
        None => sandbox.requests(),
    };
    Json(requests)
}

/// `GET /_sandbox/sends`: the template messages that went out, with the time each call
/// arrived (the load tool's provider-receipt clock; the request log keeps only 10,000).
async fn list_sends(State(sandbox): State<Sandbox>) -> Json<Vec<AcceptedSend>> {
    Json(sandbox.accepted_sends())
}

/// `DELETE /_sandbox/requests`
async fn clear_requests(State(sandbox): State<Sandbox>) -> StatusCode {
    sandbox.clear_requests();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct InjectErrors {
    path: String,
    errcodes: Vec<i64>,
}

/// `POST /_sandbox/errors` `{"path": "/cgi-bin/message/template/send", "errcodes": [45011, -1]}`
async fn inject_errors(
    State(sandbox): State<Sandbox>,
    Json(body): Json<InjectErrors>,
) -> StatusCode {
    sandbox.inject_errors(&body.path, body.errcodes);
    StatusCode::NO_CONTENT
}

/// `POST /_sandbox/apps` with a [`SandboxApp`]: adds it, or replaces the one with its appid.
async fn add_app(State(sandbox): State<Sandbox>, Json(app): Json<SandboxApp>) -> StatusCode {
    sandbox.add_app(app);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct CallbackStatus {
    openid: String,
    status: String,
}

/// `POST /_sandbox/callback-status` `{"openid": "...", "status": "failed:user block"}`
async fn set_callback_status(
    State(sandbox): State<Sandbox>,
    Json(body): Json<CallbackStatus>,
) -> StatusCode {
    sandbox.set_callback_status(&body.openid, &body.status);
    StatusCode::NO_CONTENT
}

/// `GET /_sandbox/callbacks`
#[derive(Deserialize)]
struct Grant {
    appid: String,
    openid: String,
    template_id: String,
    #[serde(default = "one")]
    times: u32,
}

fn one() -> u32 {
    1
}

/// The user accepts `times` subscribe messages of the template (WeChat's subscription dialog).
async fn grant_subscription(
    State(sandbox): State<Sandbox>,
    Json(grant): Json<Grant>,
) -> StatusCode {
    sandbox.grant_subscription(&grant.appid, &grant.openid, &grant.template_id, grant.times);
    StatusCode::NO_CONTENT
}

async fn list_callbacks(State(sandbox): State<Sandbox>) -> Json<Vec<CallbackAttempt>> {
    Json(sandbox.callbacks())
}

#[derive(Deserialize)]
struct AppidBody {
    appid: String,
}

/// `POST /_sandbox/tokens/invalidate` `{"appid": "wx…"}`: the app's working tokens answer 40001.
async fn invalidate_tokens(
    State(sandbox): State<Sandbox>,
    Json(body): Json<AppidBody>,
) -> Json<serde_json::Value> {
    let count = sandbox.invalidate_tokens(&body.appid);
    Json(serde_json::json!({ "invalidated": count }))
}

/// `POST /_sandbox/tokens/expire` `{"appid": "wx…"}`: the app's tokens answer 42001.
async fn expire_tokens(
    State(sandbox): State<Sandbox>,
    Json(body): Json<AppidBody>,
) -> Json<serde_json::Value> {
    let count = sandbox.expire_tokens(&body.appid);
    Json(serde_json::json!({ "expired": count }))
}

/// `GET /_sandbox/tokens/calls?appid=wx…` → `{"classic": n, "stable": n, "stable_forced": n}`.
async fn token_calls(
    State(sandbox): State<Sandbox>,
    Query(query): Query<AppidBody>,
) -> Json<TokenCalls> {
    Json(sandbox.token_calls(&query.appid))
}
