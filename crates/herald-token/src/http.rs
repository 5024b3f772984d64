//! The HTTP JSON API.

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::{TokenError, TokenService};

pub(crate) fn router(service: TokenService) -> Router {
    let v1 = Router::new()
        .route("/v1/tokens/{account}", get(get_token))
        .route("/v1/tokens/{account}/invalidate", post(invalidate))
        .route_layer(middleware::from_fn_with_state(
            service.clone(),
            require_bearer,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(v1)
        .with_state(service)
}

/// The bearer token of an `Authorization` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn require_bearer(
    State(service): State<TokenService>,
    request: Request,
    next: Next,
) -> Response {
    let presented = bearer(request.headers()).unwrap_or("");
    // Constant time for equal lengths; only the length can leak.
    let ok: bool = presented
        .as_bytes()
        .ct_eq(service.auth_token().as_bytes())
        .into();
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({"error": "unauthorized"})),
        )
            .into_response();
    }
    next.run(request).await
}

impl IntoResponse for TokenError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            TokenError::UnknownAccount(account) => (
                StatusCode::NOT_FOUND,
                json!({"error": "unknown_account", "account": account}),
            ),
            TokenError::Misconfigured {
                account,
                errcode,
                errmsg,
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "account_misconfigured", "account": account,
                       "errcode": errcode, "errmsg": errmsg}),
            ),
            TokenError::ProviderUnavailable {
                account,
                errcode,
                message,
            } => {
                let mut body = json!({"error": "provider_unavailable", "account": account,
                                      "message": message});
                if let Some(errcode) = errcode {
                    body["errcode"] = errcode.into();
                }
                (StatusCode::SERVICE_UNAVAILABLE, body)
            }
            TokenError::Config(message) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "internal", "message": message}),
            ),
        };
        (status, Json(body)).into_response()
    }
}

async fn get_token(
    State(service): State<TokenService>,
    Path(account): Path<String>,
) -> Result<Response, TokenError> {
    Ok(Json(service.token(&account).await?).into_response())
}

#[derive(Deserialize)]
struct InvalidateRequest {
    access_token: String,
}

async fn invalidate(
    State(service): State<TokenService>,
    Path(account): Path<String>,
    body: Result<Json<InvalidateRequest>, JsonRejection>,
) -> Result<Response, TokenError> {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return Ok((
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "bad_request", "message": rejection.body_text()})),
            )
                .into_response());
        }
    };
    Ok(Json(service.invalidate(&account, &body.access_token).await?).into_response())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(service): State<TokenService>) -> Response {
    let readiness = service.readiness().await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
    }
}
