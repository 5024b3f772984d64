//! The TEMPLATESENDJOBFINISH callback, POSTed like WeChat does in the app's mode: signed query
//! (`signature, timestamp, nonce, openid`), XML body; in compatible and safe mode also
//! `encrypt_type=aes&msg_signature=…` and the body encrypted with the app's EncodingAESKey
//! (safe: only `<Encrypt>`; compatible: plaintext and `<Encrypt>`). Retried until the receiver
//! answers HTTP 200 with `success` or an empty body.
//!
//! The message crypto here is written independently of Herald's receiver on purpose: the two
//! meet only on the wire, and both are checked against the official vectors.

use std::time::Duration;

use base64::Engine;
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockModeEncrypt, KeyIvInit};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::{CallbackMode, MAX_CALLBACKS, Sandbox};

/// One callback POST the sandbox made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallbackAttempt {
    pub appid: String,
    pub openid: String,
    pub msgid: u64,
    /// The full URL POSTed to, query included.
    pub url: String,
    /// The XML body.
    pub body: String,
    /// 1-based attempt number for this msgid.
    pub attempt: u32,
    /// The receiver's HTTP status, when it answered at all.
    pub status: Option<u16>,
    /// The receiver's answer body (truncated), when it answered.
    pub response: Option<String>,
    /// Transport error or timeout, when it did not answer.
    pub error: Option<String>,
    /// Whether WeChat would stop retrying: HTTP 200 with `success` or an empty body.
    pub accepted: bool,
    pub at: DateTime<Utc>,
}

/// A finished send whose callback is due.
pub(crate) struct CallbackJob {
    pub appid: String,
    pub openid: String,
    pub msgid: u64,
    pub status: String,
    pub event: CallbackEvent,
}

/// Which event reports the send.
pub(crate) enum CallbackEvent {
    /// Template messages: `TEMPLATESENDJOBFINISH` with `Status`.
    TemplateSendJobFinish,
    /// Subscribe messages: `subscribe_msg_sent_event` with one `List` item.
    SubscribeMsgSent { template_id: String },
}

/// Longest receiver answer kept in the attempt record.
const MAX_RESPONSE_CHARS: usize = 512;

pub(crate) fn schedule(sandbox: Sandbox, job: CallbackJob) {
    tokio::spawn(async move { deliver(sandbox, job).await });
}

async fn deliver(sandbox: Sandbox, job: CallbackJob) {
    let config = &sandbox.inner.config;
    tokio::time::sleep(Duration::from_millis(config.callback_delay_ms)).await;
    // Read the app when the job finishes, as WeChat reads its server configuration then.
    let Some(target) = sandbox.callback_target(&job.appid) else {
        tracing::debug!(
            appid = job.appid,
            msgid = job.msgid,
            "no callback URL, callback skipped"
        );
        return;
    };
    let create_time = sandbox.clock().now().timestamp();
    let body = match &job.event {
        CallbackEvent::TemplateSendJobFinish => event_xml(
            &target.original_id,
            &job.openid,
            create_time,
            job.msgid,
            &job.status,
        ),
        CallbackEvent::SubscribeMsgSent { template_id } => subscribe_sent_xml(
            &target.original_id,
            &job.openid,
            create_time,
            template_id,
            job.msgid,
        ),
    };
    let timeout = Duration::from_millis(config.callback_timeout_ms);
    let attempts = config.callback_attempts.max(1);
    for attempt in 1..=attempts {
        let record = post_once(&sandbox, &job, &target, &body, attempt, timeout).await;
        let accepted = record.accepted;
        tracing::info!(
            appid = job.appid,
            msgid = job.msgid,
            attempt,
            status = record.status,
            error = record.error,
            accepted,
            "send result callback"
        );
        {
            let mut state = sandbox.lock();
            if state.callbacks.len() >= MAX_CALLBACKS {
                state.callbacks.pop_front();
            }
            state.callbacks.push_back(record);
        }
        sandbox.inner.callbacks_changed.send_modify(|n| *n += 1);
        if accepted {
            return;
        }
        if attempt < attempts {
            tokio::time::sleep(Duration::from_millis(config.callback_retry_interval_ms)).await;
        }
    }
}

/// Where and how an app's callbacks go (read when one is due, as WeChat reads its server
/// configuration then).
pub(crate) struct CallbackTarget {
    url: String,
    token: String,
    original_id: String,
    appid: String,
    mode: CallbackMode,
    encoding_aes_key: Option<String>,
}

impl Sandbox {
    fn callback_target(&self, appid: &str) -> Option<CallbackTarget> {
        let state = self.lock();
        let app = state.apps.get(appid)?;
        Some(CallbackTarget {
            url: app.callback_url.clone()?,
            token: app.callback_token.clone(),
            original_id: app.original_id.clone(),
            appid: app.appid.clone(),
            mode: app.callback_mode,
            encoding_aes_key: app.encoding_aes_key.clone(),
        })
    }

    /// Test knob: POSTs `body` (a plain XML or JSON callback body, e.g. a `subscribe` event)
    /// once to `appid`'s callback URL as WeChat would in the app's mode: signed, and encrypted
    /// in compatible or safe mode. Not retried and not recorded; `None` when the app has no
    /// callback URL.
    pub async fn post_callback(
        &self,
        appid: &str,
        openid: &str,
        body: &str,
    ) -> Option<CallbackAttempt> {
        let target = self.callback_target(appid)?;
        let job = CallbackJob {
            appid: appid.to_owned(),
            openid: openid.to_owned(),
            msgid: 0,
            status: String::new(),
            // Only the body given is posted; the event kind is not used.
            event: CallbackEvent::TemplateSendJobFinish,
        };
        let timeout = Duration::from_millis(self.inner.config.callback_timeout_ms);
        Some(post_once(self, &job, &target, body, 1, timeout).await)
    }
}

async fn post_once(
    sandbox: &Sandbox,
    job: &CallbackJob,
    target: &CallbackTarget,
    body: &str,
    attempt: u32,
    timeout: Duration,
) -> CallbackAttempt {
    let timestamp = sandbox.clock().now().timestamp().to_string();
    let nonce = rand::random::<u32>().to_string();
    let signature = sign(&target.token, &timestamp, &nonce);
    let mut query = vec![
        ("signature", signature),
        ("timestamp", timestamp.clone()),
        ("nonce", nonce.clone()),
        ("openid", job.openid.clone()),
    ];
    let encrypted = match (target.mode, target.encoding_aes_key.as_deref()) {
        (CallbackMode::Plain, _) => None,
        (mode, Some(key)) => encrypt(key, &target.appid, body.as_bytes()).map(|e| (mode, e)),
        (mode, None) => {
            tracing::warn!(
                appid = target.appid,
                ?mode,
                "no EncodingAESKey: callback sent plain"
            );
            None
        }
    };
    let body = match encrypted {
        None => body.to_owned(),
        Some((mode, encrypt)) => {
            let msg_signature = sign_all(&[&target.token, &timestamp, &nonce, &encrypt]);
            query.push(("encrypt_type", "aes".to_owned()));
            query.push(("msg_signature", msg_signature));
            envelope(mode, &target.original_id, body, &encrypt)
        }
    };
    let url = target.url.as_str();
    let mut record = CallbackAttempt {
        appid: job.appid.clone(),
        openid: job.openid.clone(),
        msgid: job.msgid,
        url: url.to_owned(),
        body: body.clone(),
        attempt,
        status: None,
        response: None,
        error: None,
        accepted: false,
        at: sandbox.clock().now(),
    };
    let request = sandbox
        .inner
        .http
        .post(url)
        .query(&query)
        .header(
            reqwest::header::CONTENT_TYPE,
            if body.trim_start().starts_with('{') {
                "application/json"
            } else {
                "text/xml"
            },
        )
        .body(body)
        // Covers connect, answer and body: WeChat gives the receiver 5 s in all.
        .timeout(timeout)
        .build();
    let request = match request {
        Ok(request) => request,
        Err(err) => {
            record.error = Some(err.to_string());
            return record;
        }
    };
    record.url = request.url().to_string();
    match sandbox.inner.http.execute(request).await {
        Ok(response) => {
            let status = response.status();
            record.status = Some(status.as_u16());
            match response.text().await {
                Ok(text) => {
                    record.accepted =
                        status == reqwest::StatusCode::OK && matches!(text.trim(), "" | "success");
                    record.response = Some(text.chars().take(MAX_RESPONSE_CHARS).collect());
                }
                Err(err) => record.error = Some(err.to_string()),
            }
        }
        Err(err) => record.error = Some(error_text(&err)),
    }
    record
}

fn error_text(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        "timeout".to_owned()
    } else {
        // reqwest's Display hides the cause ("error sending request"); keep the chain.
        let mut text = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

/// WeChat's plain-mode signature: hex(sha1(sorted([token, timestamp, nonce]) joined)).
pub(crate) fn sign(token: &str, timestamp: &str, nonce: &str) -> String {
    sign_all(&[token, timestamp, nonce])
}

/// hex(sha1(sorted(parts) joined)): `msg_signature` is this over token, timestamp, nonce and
/// the `Encrypt` value.
fn sign_all(parts: &[&str]) -> String {
    let mut parts = parts.to_vec();
    parts.sort_unstable();
    hex::encode(Sha1::digest(parts.concat().as_bytes()))
}

/// WeChat's message encryption: AES-256-CBC with key = base64(EncodingAESKey + "="),
/// IV = key[..16], over 16 random bytes ‖ u32 BE length ‖ msg ‖ appid, PKCS#7-padded to 32
/// bytes (by hand: the cipher's own padding is to its 16-byte block). `None` for a bad key.
fn encrypt(encoding_aes_key: &str, appid: &str, msg: &[u8]) -> Option<String> {
    const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    let key = LENIENT
        .decode(format!("{}=", encoding_aes_key.trim()))
        .ok()?;
    if key.len() != 32 {
        return None;
    }
    let mut data: Vec<u8> = (0..16).map(|_| rand::random::<u8>()).collect();
    data.extend_from_slice(&u32::try_from(msg.len()).ok()?.to_be_bytes());
    data.extend_from_slice(msg);
    data.extend_from_slice(appid.as_bytes());
    let pad = 32 - data.len() % 32;
    data.extend(std::iter::repeat_n(u8::try_from(pad).ok()?, pad));
    let len = data.len();
    let encryptor = cbc::Encryptor::<aes::Aes256>::new_from_slices(&key, &key[..16]).ok()?;
    let ciphertext = encryptor.encrypt_padded::<NoPadding>(&mut data, len).ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(ciphertext))
}

/// The body of an encrypted callback: safe mode sends only the ciphertext, compatible mode the
/// plaintext with the ciphertext added (XML or JSON, like the plaintext).
fn envelope(mode: CallbackMode, to_user: &str, plaintext: &str, encrypt: &str) -> String {
    let json = plaintext.trim_start().starts_with('{');
    match (mode, json) {
        (CallbackMode::Compatible, false) => match plaintext.rfind("</xml>") {
            Some(end) => format!(
                "{}<Encrypt>{}</Encrypt></xml>",
                &plaintext[..end],
                cdata(encrypt)
            ),
            None => plaintext.to_owned(),
        },
        (CallbackMode::Compatible, true) => {
            let mut value: serde_json::Value =
                serde_json::from_str(plaintext).unwrap_or_else(|_| serde_json::json!({}));
            value["Encrypt"] = serde_json::Value::String(encrypt.to_owned());
            value.to_string()
        }
        (_, true) => serde_json::json!({ "ToUserName": to_user, "Encrypt": encrypt }).to_string(),
        (_, false) => format!(
            "<xml><ToUserName>{}</ToUserName><Encrypt>{}</Encrypt></xml>",
            cdata(to_user),
            cdata(encrypt)
        ),
    }
}

fn event_xml(to_user: &str, openid: &str, create_time: i64, msgid: u64, status: &str) -> String {
    format!(
        "<xml><ToUserName>{}</ToUserName><FromUserName>{}</FromUserName>\
         <CreateTime>{create_time}</CreateTime><MsgType><![CDATA[event]]></MsgType>\
         <Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>{msgid}</MsgID>\
         <Status>{}</Status></xml>",
        cdata(to_user),
        cdata(openid),
        cdata(status),
    )
}

/// `subscribe_msg_sent_event` for one message (success: ErrorCode 0, ErrorStatus success).
fn subscribe_sent_xml(
    to_user: &str,
    openid: &str,
    create_time: i64,
    template_id: &str,
    msgid: u64,
) -> String {
    format!(
        "<xml><ToUserName>{}</ToUserName><FromUserName>{}</FromUserName>\
         <CreateTime>{create_time}</CreateTime><MsgType><![CDATA[event]]></MsgType>\
         <Event><![CDATA[subscribe_msg_sent_event]]></Event><SubscribeMsgSentEvent><List>\
         <TemplateId>{}</TemplateId><MsgID>{msgid}</MsgID><ErrorCode>0</ErrorCode>\
         <ErrorStatus><![CDATA[success]]></ErrorStatus></List></SubscribeMsgSentEvent></xml>",
        cdata(to_user),
        cdata(openid),
        cdata(template_id),
    )
}

/// CDATA section that stays well-formed even if the text contains `]]>`.
fn cdata(text: &str) -> String {
    format!("<![CDATA[{}]]>", text.replace("]]>", "]]]]><![CDATA[>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_sorts_then_hashes() {
        // sha1("1409304348" + "nonce" + "token"): digits sort before letters.
        assert_eq!(
            sign("token", "1409304348", "nonce"),
            "c21d07973d69a8327f8346d879d072ef58bd3a9a"
        );
    }

    #[test]
    fn encryption_is_wechats() {
        use cbc::cipher::BlockModeDecrypt;
        // The official sample's key; the receiver side is checked against its ciphertexts.
        let key_text = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
        let msg = "<xml><Content>hi</Content></xml>";
        let ciphertext = encrypt(key_text, "wx2c2769f8efd9abc2", msg.as_bytes()).expect("encrypts");
        let mut data = base64::engine::general_purpose::STANDARD
            .decode(&ciphertext)
            .expect("base64");
        assert_eq!(data.len() % 32, 0, "padded to 32 bytes");
        // The sample key's last character carries spare bits, which WeChat ignores.
        let key = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
        )
        .decode(format!("{key_text}="))
        .expect("key");
        let plain = cbc::Decryptor::<aes::Aes256>::new_from_slices(&key, &key[..16])
            .expect("key")
            .decrypt_padded::<NoPadding>(&mut data)
            .expect("decrypts")
            .to_vec();
        let pad = usize::from(*plain.last().expect("bytes"));
        assert!((1..=32).contains(&pad));
        let plain = &plain[..plain.len() - pad];
        let len = u32::from_be_bytes(plain[16..20].try_into().expect("length")) as usize;
        assert_eq!(&plain[20..20 + len], msg.as_bytes());
        assert_eq!(&plain[20 + len..], b"wx2c2769f8efd9abc2");
        assert_eq!(encrypt("short", "wx", b"x"), None);
    }

    #[test]
    fn envelopes_per_mode() {
        let xml = "<xml><MsgType>event</MsgType></xml>";
        assert_eq!(
            envelope(CallbackMode::Safe, "gh_x", xml, "E=="),
            "<xml><ToUserName><![CDATA[gh_x]]></ToUserName><Encrypt><![CDATA[E==]]></Encrypt></xml>"
        );
        assert_eq!(
            envelope(CallbackMode::Compatible, "gh_x", xml, "E=="),
            "<xml><MsgType>event</MsgType><Encrypt><![CDATA[E==]]></Encrypt></xml>"
        );
        let json = r#"{"MsgType":"event"}"#;
        let safe: serde_json::Value =
            serde_json::from_str(&envelope(CallbackMode::Safe, "gh_x", json, "E==")).expect("json");
        assert_eq!(
            safe,
            serde_json::json!({"ToUserName": "gh_x", "Encrypt": "E=="})
        );
        let compatible: serde_json::Value =
            serde_json::from_str(&envelope(CallbackMode::Compatible, "gh_x", json, "E=="))
                .expect("json");
        assert_eq!(
            compatible,
            serde_json::json!({"MsgType": "event", "Encrypt": "E=="})
        );
    }

    #[test]
    fn xml_shape() {
        let xml = event_xml("gh_x", "openid", 1, 42, "failed: system failed");
        assert_eq!(
            xml,
            "<xml><ToUserName><![CDATA[gh_x]]></ToUserName><FromUserName><![CDATA[openid]]></FromUserName>\
             <CreateTime>1</CreateTime><MsgType><![CDATA[event]]></MsgType>\
             <Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>42</MsgID>\
             <Status><![CDATA[failed: system failed]]></Status></xml>"
        );
        assert_eq!(cdata("a]]>b"), "<![CDATA[a]]]]><![CDATA[>b]]>");
    }
}
