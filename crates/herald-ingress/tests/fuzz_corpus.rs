//! Replays the committed fuzz corpora of request decoding (`fuzz/corpus/request_json`,
//! `fuzz/corpus/request_proto`) through the fuzz targets' own checks, on stable Rust.

#[path = "../../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../../fuzz/src/request.rs"]
mod request;

#[test]
fn request_json_corpus() {
    replay::replay("request_json", request::request_json);
}

#[test]
fn request_proto_corpus() {
    replay::replay("request_proto", request::request_proto);
}
