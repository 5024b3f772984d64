//! Replays the committed fuzz corpora of callbacks (`fuzz/corpus/wechat_xml`,
//! `fuzz/corpus/callback_decrypt`) through the fuzz targets' own checks, on stable Rust.

#[path = "../../../fuzz/src/callback.rs"]
mod callback;
#[path = "../../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn wechat_xml_corpus() {
    replay::replay("wechat_xml", callback::wechat_body);
}

#[test]
fn callback_decrypt_corpus() {
    replay::replay("callback_decrypt", callback::callback_decrypt);
}
