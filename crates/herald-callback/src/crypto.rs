//! The message crypto of WeChat and WeCom callbacks ("WXBizMsgCrypt"), and the signatures of
//! the other providers' robots.
//!
//! - `key = base64(EncodingAESKey + "=")` (32 bytes), `IV = key[0..16]`, AES-256-CBC.
//! - plaintext = 16 random bytes ‖ u32 big-endian length of msg ‖ msg ‖ appid (corpid for WeCom),
//!   PKCS#7-padded to a **32-byte** block.
//! - `msg_signature = hex(sha1(sorted([token, timestamp, nonce, encrypt]).join("")))`.

use aes::Aes256;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use hmac::{Hmac, KeyInit, Mac};
use sha1::{Digest, Sha1};
use sha2::Sha256;

/// WeChat pads to 32 bytes, not AES's 16. RustCrypto's `Pkcs7` padding pads and checks to the
/// cipher's block size (16) and so rejects padding bytes 17..=32 that the official SDKs
/// produce; the block mode runs with `NoPadding` and the 32-byte PKCS#7 is done by hand here.
const PAD_BLOCK: usize = 32;
/// EncodingAESKeys are 43 random base64 characters, so the last one usually carries bits beyond
/// the 32 bytes; WeChat's SDKs ignore them, as does this engine (the standard one refuses them).
const KEY_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);
/// The random prefix and the length field before the message.
const PREFIX_LEN: usize = 16;
const HEADER_LEN: usize = PREFIX_LEN + 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("EncodingAESKey must be 43 base64 characters decoding to 32 bytes")]
    InvalidKey,
    #[error("ciphertext is not base64")]
    NotBase64,
    #[error("ciphertext length is not a whole number of AES blocks")]
    BadLength,
    #[error("bad padding")]
    BadPadding,
    #[error("decrypted message is malformed")]
    Malformed,
    #[error("message is for another app (appid/corpid mismatch)")]
    ReceiverMismatch,
}

/// `hex(sha1(sorted(parts).join("")))`: WeChat's URL `signature` (token, timestamp, nonce) and
/// `msg_signature` (token, timestamp, nonce, encrypt/echostr).
pub fn sha1_signature(parts: &[&str]) -> String {
    let mut parts = parts.to_vec();
    parts.sort_unstable();
    hex::encode(Sha1::digest(parts.concat().as_bytes()))
}

/// The `msg_signature` over an encrypted message (or WeCom's encrypted `echostr`).
pub fn msg_signature(token: &str, timestamp: &str, nonce: &str, encrypt: &str) -> String {
    sha1_signature(&[token, timestamp, nonce, encrypt])
}

/// Compares hex signatures in constant time (case-insensitive).
pub fn signature_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.to_ascii_lowercase().into_bytes());
    a.len() == b.len() && a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// PKCS#7 to a 32-byte block: 1..=32 bytes, each holding the pad length.
pub fn pkcs7_pad32(data: &mut Vec<u8>) {
    let pad = PAD_BLOCK - data.len() % PAD_BLOCK;
    // pad is in 1..=32, so it fits a byte.
    data.resize(data.len() + pad, pad as u8);
}

/// Removes 32-byte PKCS#7 padding, checking every padding byte.
pub fn pkcs7_unpad32(data: &[u8]) -> Result<&[u8], CryptoError> {
    let pad = usize::from(*data.last().ok_or(CryptoError::BadPadding)?);
    if pad == 0 || pad > PAD_BLOCK || pad > data.len() {
        return Err(CryptoError::BadPadding);
    }
    let (body, padding) = data.split_at(data.len() - pad);
    if padding.iter().any(|&b| usize::from(b) != pad) {
        return Err(CryptoError::BadPadding);
    }
    Ok(body)
}

/// A decrypted message with what came around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decrypted {
    pub random_prefix: [u8; 16],
    pub message: Vec<u8>,
    /// The appid (WeChat) or corpid (WeCom) the message names.
    pub receiver_id: String,
}

/// The crypto of one account: its AES key and the appid/corpid its messages must name.
#[derive(Clone)]
pub struct MsgCrypt {
    key: [u8; 32],
    receiver_id: String,
}

impl std::fmt::Debug for MsgCrypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgCrypt")
            .field("receiver_id", &self.receiver_id)
            .field("key", &"***")
            .finish()
    }
}

impl MsgCrypt {
    /// `encoding_aes_key` is the 43-character EncodingAESKey of the console; `receiver_id` the
    /// appid (WeChat) or corpid (WeCom).
    pub fn new(encoding_aes_key: &str, receiver_id: &str) -> Result<Self, CryptoError> {
        let encoding_aes_key = encoding_aes_key.trim();
        if encoding_aes_key.len() != 43 {
            return Err(CryptoError::InvalidKey);
        }
        let key = KEY_BASE64
            .decode(format!("{encoding_aes_key}="))
            .map_err(|_| CryptoError::InvalidKey)?;
        let key: [u8; 32] = key.try_into().map_err(|_| CryptoError::InvalidKey)?;
        Ok(Self {
            key,
            receiver_id: receiver_id.to_string(),
        })
    }

    pub fn receiver_id(&self) -> &str {
        &self.receiver_id
    }

    fn iv(&self) -> &[u8] {
        &self.key[..16]
    }

    /// Decrypts without checking whose message it is.
    pub fn decrypt_raw(&self, encrypt: &str) -> Result<Decrypted, CryptoError> {
        let mut data = BASE64
            .decode(encrypt.trim())
            .map_err(|_| CryptoError::NotBase64)?;
        if data.is_empty() || data.len() % PAD_BLOCK != 0 {
            // WeChat's ciphertexts are whole 32-byte pad blocks (which are two AES blocks).
            return Err(CryptoError::BadLength);
        }
        let decryptor = cbc::Decryptor::<Aes256>::new_from_slices(&self.key, self.iv())
            .map_err(|_| CryptoError::InvalidKey)?;
        let plain = decryptor
            .decrypt_padded::<NoPadding>(&mut data)
            .map_err(|_| CryptoError::BadLength)?;
        let plain = pkcs7_unpad32(plain)?;
        if plain.len() < HEADER_LEN {
            return Err(CryptoError::Malformed);
        }
        let mut random_prefix = [0u8; 16];
        random_prefix.copy_from_slice(&plain[..PREFIX_LEN]);
        let mut length = [0u8; 4];
        length.copy_from_slice(&plain[PREFIX_LEN..HEADER_LEN]);
        let length =
            usize::try_from(u32::from_be_bytes(length)).map_err(|_| CryptoError::Malformed)?;
        let rest = &plain[HEADER_LEN..];
        if length > rest.len() {
            return Err(CryptoError::Malformed);
        }
        let (message, receiver) = rest.split_at(length);
        let receiver_id =
            String::from_utf8(receiver.to_vec()).map_err(|_| CryptoError::Malformed)?;
        Ok(Decrypted {
            random_prefix,
            message: message.to_vec(),
            receiver_id,
        })
    }

    /// Decrypts and checks the message names this account's appid/corpid.
    pub fn decrypt(&self, encrypt: &str) -> Result<Vec<u8>, CryptoError> {
        let decrypted = self.decrypt_raw(encrypt)?;
        if decrypted.receiver_id != self.receiver_id {
            return Err(CryptoError::ReceiverMismatch);
        }
        Ok(decrypted.message)
    }

    /// Encrypts `message` with a fresh random prefix.
    pub fn encrypt(&self, message: &[u8]) -> String {
        let mut prefix = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut prefix);
        self.encrypt_with_prefix(&prefix, message)
    }

    /// Encrypts `message` behind the given 16-byte prefix (deterministic; for the vectors).
    pub fn encrypt_with_prefix(&self, prefix: &[u8; 16], message: &[u8]) -> String {
        let length = u32::try_from(message.len()).unwrap_or(u32::MAX);
        let mut data = Vec::with_capacity(HEADER_LEN + message.len() + self.receiver_id.len() + 32);
        data.extend_from_slice(prefix);
        data.extend_from_slice(&length.to_be_bytes());
        data.extend_from_slice(message);
        data.extend_from_slice(self.receiver_id.as_bytes());
        pkcs7_pad32(&mut data);
        let len = data.len();
        // The key and IV lengths are fixed, and `data` is a whole number of AES blocks, so
        // neither step can fail.
        let ciphertext = cbc::Encryptor::<Aes256>::new_from_slices(&self.key, self.iv())
            .ok()
            .and_then(|encryptor| encryptor.encrypt_padded::<NoPadding>(&mut data, len).ok())
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        BASE64.encode(ciphertext)
    }

    /// An encrypted reply (XML form):
    /// `<xml><Encrypt/><MsgSignature/><TimeStamp/><Nonce/></xml>`.
    pub fn encrypted_reply_xml(
        &self,
        token: &str,
        message: &[u8],
        timestamp: &str,
        nonce: &str,
    ) -> String {
        let encrypt = self.encrypt(message);
        let signature = msg_signature(token, timestamp, nonce, &encrypt);
        format!(
            "<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt><MsgSignature><![CDATA[{signature}]]></MsgSignature>\
             <TimeStamp>{timestamp}</TimeStamp><Nonce><![CDATA[{nonce}]]></Nonce></xml>"
        )
    }
}

/// DingTalk custom robot: `base64(HMAC-SHA256(key = secret, msg = timestamp_ms + "\n" + secret))`
/// (URL-encode it for the query: [`percent_encode_base64`]).
pub fn dingtalk_robot_sign(timestamp_ms: &str, secret: &str) -> String {
    hmac_sha256_base64(
        secret.as_bytes(),
        format!("{timestamp_ms}\n{secret}").as_bytes(),
    )
}

/// Feishu/Lark custom robot: `base64(HMAC-SHA256(key = timestamp_s + "\n" + secret, msg = ""))`.
pub fn feishu_robot_sign(timestamp_s: &str, secret: &str) -> String {
    hmac_sha256_base64(format!("{timestamp_s}\n{secret}").as_bytes(), b"")
}

/// Percent-encodes the three characters of the standard base64 alphabet that are not
/// URL-safe (`+`, `/`, `=`), which is all a base64 signature needs.
pub fn percent_encode_base64(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '+' => out.push_str("%2B"),
            '/' => out.push_str("%2F"),
            '=' => out.push_str("%3D"),
            c => out.push(c),
        }
    }
    out
}

fn hmac_sha256_base64(key: &[u8], message: &[u8]) -> String {
    // HMAC takes keys of any length.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(message);
    BASE64.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct Vectors {
        wechat_url_signature: Vec<UrlSignature>,
        wechat_safe_mode: Vec<SafeMode>,
        wecom_callback: Vec<Wecom>,
        dingtalk_robot_sign: Vec<DingTalk>,
        feishu_robot_sign: Vec<Feishu>,
    }

    #[derive(Deserialize)]
    struct UrlSignature {
        token: String,
        timestamp: String,
        nonce: String,
        signature: String,
        must_reject_signature: Option<String>,
    }

    #[derive(Deserialize)]
    struct SafeMode {
        token: String,
        encoding_aes_key: String,
        appid: String,
        timestamp: String,
        nonce: String,
        url_signature: Option<String>,
        msg_signature: String,
        encrypt: String,
        plaintext: String,
        random_prefix: String,
        pkcs7_pad_len: usize,
        reply: Option<Reply>,
    }

    #[derive(Deserialize)]
    struct Reply {
        random_prefix: String,
        plaintext: String,
        timestamp: String,
        nonce: String,
        encrypt: String,
        msg_signature: String,
    }

    #[derive(Deserialize)]
    struct Wecom {
        token: String,
        encoding_aes_key: String,
        corpid: String,
        verify_url: WecomVerify,
        post: WecomPost,
    }

    #[derive(Deserialize)]
    struct WecomVerify {
        timestamp: String,
        nonce: String,
        msg_signature: String,
        echostr: String,
        echostr_plaintext: String,
    }

    #[derive(Deserialize)]
    struct WecomPost {
        timestamp: String,
        nonce: String,
        msg_signature: String,
        encrypt: String,
        plaintext: String,
        pkcs7_pad_len: usize,
    }

    #[derive(Deserialize)]
    struct DingTalk {
        timestamp_ms: String,
        secret: String,
        sign_base64: String,
        sign_urlencoded: Option<String>,
    }

    #[derive(Deserialize)]
    struct Feishu {
        timestamp_s: String,
        secret: String,
        sign: String,
    }

    fn vectors() -> Vectors {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/vectors/crypto.json"
        );
        let text = std::fs::read_to_string(path).expect("tests/vectors/crypto.json");
        serde_json::from_str(&text).expect("vectors parse")
    }

    fn prefix(text: &str) -> [u8; 16] {
        text.as_bytes()
            .try_into()
            .expect("16-character random prefix")
    }

    /// The padding length of a ciphertext, read from its last decrypted byte.
    fn pad_len(crypt: &MsgCrypt, encrypt: &str) -> usize {
        let mut data = BASE64.decode(encrypt).expect("base64");
        let decryptor =
            cbc::Decryptor::<Aes256>::new_from_slices(&crypt.key, crypt.iv()).expect("key");
        let plain = decryptor
            .decrypt_padded::<NoPadding>(&mut data)
            .expect("blocks");
        usize::from(*plain.last().expect("non-empty"))
    }

    #[test]
    fn url_signature_vectors() {
        let vectors = vectors();
        assert!(!vectors.wechat_url_signature.is_empty());
        for v in vectors.wechat_url_signature {
            let expected = sha1_signature(&[&v.token, &v.timestamp, &v.nonce]);
            assert_eq!(expected, v.signature);
            assert!(signature_matches(&expected, &v.signature));
            assert!(signature_matches(&expected, &v.signature.to_uppercase()));
            if let Some(bad) = v.must_reject_signature {
                assert!(!signature_matches(&expected, &bad));
            }
        }
    }

    #[test]
    fn wechat_safe_mode_vectors() {
        let vectors = vectors();
        assert_eq!(vectors.wechat_safe_mode.len(), 2);
        for v in vectors.wechat_safe_mode {
            if let Some(url_signature) = &v.url_signature {
                assert_eq!(
                    &sha1_signature(&[&v.token, &v.timestamp, &v.nonce]),
                    url_signature
                );
            }
            // Signature over the ciphertext, and a tampered one rejected.
            let signature = msg_signature(&v.token, &v.timestamp, &v.nonce, &v.encrypt);
            assert_eq!(signature, v.msg_signature);
            let tampered =
                msg_signature(&v.token, &v.timestamp, &v.nonce, &format!("{}A", v.encrypt));
            assert!(!signature_matches(&tampered, &v.msg_signature));

            let crypt = MsgCrypt::new(&v.encoding_aes_key, &v.appid).expect("key");
            let decrypted = crypt.decrypt_raw(&v.encrypt).expect("decrypts");
            assert_eq!(decrypted.random_prefix, prefix(&v.random_prefix));
            assert_eq!(decrypted.receiver_id, v.appid);
            assert_eq!(
                String::from_utf8(decrypted.message).expect("utf-8"),
                v.plaintext
            );
            assert_eq!(
                crypt.decrypt(&v.encrypt).expect("checked"),
                v.plaintext.as_bytes()
            );
            assert_eq!(pad_len(&crypt, &v.encrypt), v.pkcs7_pad_len);

            // Encrypting with the same prefix gives the official ciphertext, byte for byte.
            assert_eq!(
                crypt.encrypt_with_prefix(&prefix(&v.random_prefix), v.plaintext.as_bytes()),
                v.encrypt
            );
            // A random prefix round-trips.
            let fresh = crypt.encrypt(v.plaintext.as_bytes());
            assert_ne!(fresh, v.encrypt);
            assert_eq!(
                crypt.decrypt(&fresh).expect("round trip"),
                v.plaintext.as_bytes()
            );

            // Another app's message is refused.
            let other = MsgCrypt::new(&v.encoding_aes_key, "wx0000000000000000").expect("key");
            assert_eq!(
                other.decrypt(&v.encrypt),
                Err(CryptoError::ReceiverMismatch)
            );

            if let Some(reply) = v.reply {
                let encrypt = crypt
                    .encrypt_with_prefix(&prefix(&reply.random_prefix), reply.plaintext.as_bytes());
                assert_eq!(encrypt, reply.encrypt);
                assert_eq!(
                    msg_signature(&v.token, &reply.timestamp, &reply.nonce, &reply.encrypt),
                    reply.msg_signature
                );
                let xml = crypt.encrypted_reply_xml(
                    &v.token,
                    reply.plaintext.as_bytes(),
                    &reply.timestamp,
                    &reply.nonce,
                );
                let start = xml.find("<Encrypt><![CDATA[").expect("Encrypt") + 18;
                let end = xml[start..].find("]]>").expect("end") + start;
                let signature_start =
                    xml.find("<MsgSignature><![CDATA[").expect("MsgSignature") + 23;
                assert_eq!(
                    &xml[signature_start..signature_start + 40],
                    msg_signature(&v.token, &reply.timestamp, &reply.nonce, &xml[start..end])
                );
                assert_eq!(
                    crypt.decrypt(&xml[start..end]).expect("reply decrypts"),
                    reply.plaintext.as_bytes()
                );
            }
        }
    }

    #[test]
    fn wecom_vectors() {
        let vectors = vectors();
        assert!(!vectors.wecom_callback.is_empty());
        for v in vectors.wecom_callback {
            let crypt = MsgCrypt::new(&v.encoding_aes_key, &v.corpid).expect("key");
            // URL verification: msg_signature over the encrypted echostr, answer its plaintext.
            let verify = &v.verify_url;
            assert_eq!(
                msg_signature(&v.token, &verify.timestamp, &verify.nonce, &verify.echostr),
                verify.msg_signature
            );
            assert_eq!(
                crypt.decrypt(&verify.echostr).expect("echostr"),
                verify.echostr_plaintext.as_bytes()
            );
            // Callback POST.
            let post = &v.post;
            assert_eq!(
                msg_signature(&v.token, &post.timestamp, &post.nonce, &post.encrypt),
                post.msg_signature
            );
            let decrypted = crypt.decrypt_raw(&post.encrypt).expect("decrypts");
            assert_eq!(decrypted.receiver_id, v.corpid);
            assert_eq!(decrypted.message, post.plaintext.as_bytes());
            assert_eq!(pad_len(&crypt, &post.encrypt), post.pkcs7_pad_len);
            assert_eq!(
                crypt.encrypt_with_prefix(&decrypted.random_prefix, post.plaintext.as_bytes()),
                post.encrypt
            );
            let wrong = MsgCrypt::new(&v.encoding_aes_key, "wx0000000000000000").expect("key");
            assert_eq!(
                wrong.decrypt(&post.encrypt),
                Err(CryptoError::ReceiverMismatch)
            );
        }
    }

    #[test]
    fn robot_signature_vectors() {
        let vectors = vectors();
        assert!(!vectors.dingtalk_robot_sign.is_empty() && !vectors.feishu_robot_sign.is_empty());
        for v in vectors.dingtalk_robot_sign {
            let sign = dingtalk_robot_sign(&v.timestamp_ms, &v.secret);
            assert_eq!(sign, v.sign_base64);
            if let Some(encoded) = v.sign_urlencoded {
                assert_eq!(percent_encode_base64(&sign), encoded);
            }
        }
        for v in vectors.feishu_robot_sign {
            assert_eq!(feishu_robot_sign(&v.timestamp_s, &v.secret), v.sign);
        }
    }

    #[test]
    fn padding_is_to_32_bytes() {
        for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 63] {
            let mut data = vec![7u8; len];
            pkcs7_pad32(&mut data);
            assert_eq!(data.len() % 32, 0);
            let pad = data.len() - len;
            assert!((1..=32).contains(&pad), "{len} → {pad}");
            assert_eq!(pkcs7_unpad32(&data).expect("unpads"), &vec![7u8; len][..]);
        }
        assert_eq!(pkcs7_unpad32(&[1, 2, 0]), Err(CryptoError::BadPadding));
        assert_eq!(pkcs7_unpad32(&[33; 64]), Err(CryptoError::BadPadding));
        assert_eq!(pkcs7_unpad32(&[1, 3, 2, 3]), Err(CryptoError::BadPadding));
        assert_eq!(pkcs7_unpad32(&[]), Err(CryptoError::BadPadding));
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(
            MsgCrypt::new("short", "wx").err(),
            Some(CryptoError::InvalidKey)
        );
        assert_eq!(
            MsgCrypt::new("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!", "wx").err(),
            Some(CryptoError::InvalidKey)
        );
        let crypt =
            MsgCrypt::new("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "wx").expect("key");
        assert_eq!(
            crypt.decrypt("not base64 at all!").err(),
            Some(CryptoError::NotBase64)
        );
        assert_eq!(
            crypt.decrypt(&BASE64.encode([0u8; 16])).err(),
            Some(CryptoError::BadLength)
        );
        // Garbage of the right length decrypts to bad padding or a malformed message, never a panic.
        assert!(crypt.decrypt(&BASE64.encode([0u8; 64])).is_err());
    }
}
