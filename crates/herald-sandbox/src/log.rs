//! The request log: every call to the WeChat routes, with secrets redacted, for tests to assert on.

use std::collections::{BTreeMap, VecDeque};

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::Sandbox;
use crate::faults::{self, Fault};

/// One request to the WeChat API as the sandbox saw it, and what it answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedRequest {
    pub seq: u64,
    pub method: String,
    pub path: String,
    /// `secret` is "***"; `access_token` keeps only its last 6 chars ("***abc123").
    pub query: BTreeMap<String, String>,
    /// Lower-case names; credentials-bearing headers are "***".
    pub headers: BTreeMap<String, String>,
    /// The parsed JSON body, or Null. Redacted like `query`.
    pub body: Value,
    /// The JSON answer, or Null. Redacted like `query` (token responses carry a token).
    pub response: Value,
    pub at: DateTime<Utc>,
    /// The transport fault injected into this call, if any (see [`crate::Fault`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// Bodies beyond this are refused (WeChat's own limit is far lower for these APIs).
const MAX_BODY: usize = 2 * 1024 * 1024;
/// Oldest entries are dropped past this, so a long-running dev sandbox stays bounded.
const MAX_ENTRIES: usize = 10_000;

#[derive(Default)]
pub(crate) struct RequestLog {
    next_seq: u64,
    entries: VecDeque<LoggedRequest>,
}

impl RequestLog {
    fn push(&mut self, mut entry: LoggedRequest) {
        self.next_seq += 1;
        entry.seq = self.next_seq;
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
    }

    pub(crate) fn all(&self) -> Vec<LoggedRequest> {
        self.entries.iter().cloned().collect()
    }

    pub(crate) fn matching(&self, path: &str) -> Vec<LoggedRequest> {
        self.entries
            .iter()
            .filter(|entry| entry.path == path)
            .cloned()
            .collect()
    }

    /// Empties the log; `seq` keeps counting so entries from before and after never collide.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Middleware around the WeChat routes: buffers request and response to log both.
pub(crate) async fn record(
    State(sandbox): State<Sandbox>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
    };
    let mut entry = LoggedRequest {
        seq: 0,
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: redacted_query(&parts.uri),
        headers: recorded_headers(&parts.headers),
        body: redacted_json(&bytes),
        response: Value::Null,
        at: sandbox.clock().now(),
        fault: None,
    };

    let fault = sandbox.take_fault(&entry.path);
    entry.fault = fault;
    let response = match fault {
        Some(Fault::Status { status }) => faults::status_response(status),
        Some(Fault::Reset) => faults::reset_response(),
        _ => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    };
    if let Some(delay) = faults::delay_of(fault) {
        tokio::time::sleep(delay).await;
    }
    if matches!(fault, Some(Fault::Reset | Fault::ResetAfter)) {
        sandbox.lock().requests.push(entry);
        sandbox.inner.requests_changed.send_modify(|n| *n += 1);
        return faults::reset_response();
    }

    let (parts, body) = response.into_parts();
    let bytes = to_bytes(body, usize::MAX).await.unwrap_or_default();
    entry.response = redacted_json(&bytes);
    {
        let mut state = sandbox.lock();
        state.requests.push(entry);
    }
    sandbox.inner.requests_changed.send_modify(|n| *n += 1);
    Response::from_parts(parts, Body::from(bytes))
}

/// Unknown WeChat path: logged (a sender calling the wrong URL shows up in tests), then 404.
pub(crate) async fn not_found(uri: Uri) -> Response {
    let body =
        json!({ "errcode": -1, "errmsg": format!("sandbox: no such endpoint {}", uri.path()) });
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

fn redacted_query(uri: &Uri) -> BTreeMap<String, String> {
    let mut query = Query::<BTreeMap<String, String>>::try_from_uri(uri)
        .map(|Query(query)| query)
        .unwrap_or_default();
    for (key, value) in &mut query {
        if let Some(redacted) = redact(key, value) {
            *value = redacted;
        }
    }
    query
}

fn recorded_headers(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut recorded = BTreeMap::new();
    for (name, value) in headers {
        let text = match name.as_str() {
            "authorization" | "proxy-authorization" | "cookie" => "***".to_owned(),
            _ => String::from_utf8_lossy(value.as_bytes()).into_owned(),
        };
        // HeaderName is already lower-case; repeated headers are joined like HTTP would.
        recorded
            .entry(name.as_str().to_owned())
            .and_modify(|existing: &mut String| {
                existing.push_str(", ");
                existing.push_str(&text);
            })
            .or_insert(text);
    }
    recorded
}

fn redacted_json(bytes: &[u8]) -> Value {
    let mut value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    redact_value(&mut value);
    value
}

fn redact_value(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if let Value::String(text) = child
                    && let Some(redacted) = redact(key, text)
                {
                    *text = redacted;
                } else {
                    redact_value(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_value),
        _ => {}
    }
}

/// The logged form of a sensitive field, or None when the field is not sensitive.
fn redact(key: &str, value: &str) -> Option<String> {
    match key {
        "secret" => Some("***".to_owned()),
        "access_token" => Some(format!("***{}", token_suffix(value))),
        _ => None,
    }
}

/// The last 6 chars of a token, so tests can tell tokens apart; nothing of a short one.
pub(crate) fn token_suffix(token: &str) -> &str {
    if token.len() < 12 || !token.is_ascii() {
        return "";
    }
    &token[token.len() - 6..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_token_suffix_only() {
        let mut value = json!({
            "appid": "wx1",
            "secret": "s3cr3t",
            "access_token": "78_abcdefghijklmnop123456",
            "nested": [{"access_token": "short"}],
        });
        redact_value(&mut value);
        assert_eq!(value["appid"], "wx1");
        assert_eq!(value["secret"], "***");
        assert_eq!(value["access_token"], "***123456");
        assert_eq!(value["nested"][0]["access_token"], "***");
    }
}
