//! Request decoding under fuzzing: what `POST /v1/messages` and the renderer's consumer do with
//! a body, and the invariants between them.
//!
//! Shared by the fuzz targets `request_json` and `request_proto` and by the corpus test
//! `crates/herald-ingress/tests/fuzz_corpus.rs`, which includes this file by path so that CI
//! replays every committed corpus input through exactly these checks without nightly.

use herald_contract::v1::NotificationRequest;
use herald_contract::{canonical_bytes, decode_json, encode_json};
use prost::Message;

/// A JSON body as the ingress (REST) and the renderer (AMQP) receive it.
///
/// - Anything: decoding, validation and the JSON value the renderer stores return, never
///   panic.
/// - A request that validates (the ingress answers 202): the body the ingress publishes
///   decodes, at the renderer, to the same request; and its JSON value, stored in Postgres and
///   read back by the renderer before fan-out, gives the same request.
///
/// A decodable but invalid request is only checked not to panic: the ingress answers it with a
/// 400 and the renderer rejects it (both run `herald_contract::validate`).
pub fn request_json(data: &[u8]) {
    let Ok(request) = decode_json::<NotificationRequest>(data) else {
        return;
    };
    let _ = serde_json::to_value(&request);
    if herald_ingress::validate(&request).is_ok() {
        published_round_trip(&request);
        stored_round_trip(&request);
    }
}

/// Protobuf binary of a request: what a producer holding the generated types can build.
///
/// - Anything: prost decoding, validation and canonical JSON return, never panic.
/// - A request that validates: it survives prost's own round trip, its canonical JSON (what
///   is published) decodes to the same request, and its JSON value round-trips as in
///   [`request_json`].
pub fn request_proto(data: &[u8]) {
    let Ok(request) = NotificationRequest::decode(data) else {
        return;
    };
    let _ = canonical_bytes(&request);
    if herald_ingress::validate(&request).is_err() {
        return;
    }
    // Compared as JSON (`variables` is a hash map): only a valid request has one for sure.
    match NotificationRequest::decode(request.encode_to_vec().as_slice()) {
        Ok(again) => assert!(
            same(&again, &request),
            "protobuf round trip:\n{request:?}\n{again:?}"
        ),
        Err(error) => panic!("re-encoded request does not decode ({error}): {request:?}"),
    }
    published_round_trip(&request);
    stored_round_trip(&request);
}

/// The ingress publishes `encode_json(request)`; the renderer decodes it with `decode_json`.
fn published_round_trip(request: &NotificationRequest) {
    let _ = canonical_bytes(request);
    let body = encode_json(request);
    assert!(!body.is_empty(), "a valid request encodes: {request:?}");
    match decode_json::<NotificationRequest>(&body) {
        Ok(decoded) => assert!(
            same(&decoded, request),
            "published body decodes to another request:\n{request:?}\n{decoded:?}"
        ),
        Err(error) => panic!(
            "published body does not decode ({error}): {}",
            String::from_utf8_lossy(&body)
        ),
    }
}

/// The renderer stores `serde_json::to_value(request)` and reads the request back from it.
fn stored_round_trip(request: &NotificationRequest) {
    let value = match serde_json::to_value(request) {
        Ok(value) => value,
        Err(error) => panic!("request has no JSON value ({error}): {request:?}"),
    };
    match serde_json::from_value::<NotificationRequest>(value.clone()) {
        Ok(decoded) => assert!(
            same(&decoded, request),
            "stored request reads back as another:\n{request:?}\n{decoded:?}"
        ),
        Err(error) => panic!("stored request does not read back ({error}): {value}"),
    }
}

/// Equal, except that a number in `variables` may differ in its last bits: serde_json's
/// default float parser is not correctly rounded (its `float_roundtrip` feature is), so a
/// number can move by an ulp or two between ingress and renderer (found by `request_proto`,
/// `crash-float-last-bits`; see docs/benchmarks.md, "Fuzzing").
fn same(a: &NotificationRequest, b: &NotificationRequest) -> bool {
    if a == b {
        return true;
    }
    let (Ok(a), Ok(b)) = (serde_json::to_value(a), serde_json::to_value(b)) else {
        return false;
    };
    same_value(&a, &b)
}

fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y || (x.to_bits().abs_diff(y.to_bits()) <= 4),
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}
