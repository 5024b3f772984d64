//! WeChat/WeCom callbacks under fuzzing: body parsing (XML and JSON) and the safe-mode
//! crypto, as the receiver runs them.
//!
//! Shared by the fuzz targets `wechat_xml` and `callback_decrypt` and by the corpus test
//! `crates/herald-callback/tests/fuzz_corpus.rs`, which includes this file by path so that CI
//! replays every committed corpus input through exactly these checks without nightly.

use std::sync::LazyLock;

use aes::Aes256;
use base64::Engine;
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockModeEncrypt, KeyIvInit};
use herald_callback::crypto::{
    CryptoError, MsgCrypt, msg_signature, pkcs7_pad32, pkcs7_unpad32, signature_matches,
};
use herald_callback::wechat::{self, Normalised};
use herald_contract::decode_json;
use herald_contract::encode_json;

/// A fixed account: the official worked examples' (tests/vectors/crypto.json), so their
/// ciphertexts in the seed corpus decrypt.
pub struct Account {
    pub provider: &'static str,
    pub token: &'static str,
    pub encoding_aes_key: &'static str,
    pub receiver_id: &'static str,
}

pub const ACCOUNTS: [Account; 3] = [
    Account {
        provider: "wechat",
        token: "AAAAA",
        encoding_aes_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        receiver_id: "wxba5fad812f8e6fb9",
    },
    Account {
        provider: "wechat",
        token: "spamtest",
        encoding_aes_key: "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
        receiver_id: "wx2c2769f8efd9abc2",
    },
    Account {
        provider: "wecom",
        token: "QDG6eK",
        encoding_aes_key: "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C",
        receiver_id: "wx5823bf96d3bd56c7",
    },
];

struct Keys {
    crypt: MsgCrypt,
    key: [u8; 32],
}

static KEYS: LazyLock<Vec<Keys>> = LazyLock::new(|| {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    ACCOUNTS
        .iter()
        .map(|a| {
            let key = engine
                .decode(format!("{}=", a.encoding_aes_key))
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .expect("fixed EncodingAESKey");
            Keys {
                crypt: MsgCrypt::new(a.encoding_aes_key, a.receiver_id).expect("fixed key"),
                key,
            }
        })
        .collect()
});

/// A plain (or decrypted) callback body, as the receiver's `accept` reads it: parse, normalise,
/// publish each event as canonical JSON. Every published event must decode at the projector
/// to the same event.
pub fn wechat_body(data: &[u8]) {
    let _ = wechat::envelope_encrypt(data);
    let Ok(body) = wechat::parse(data) else {
        return;
    };
    let _ = wechat::mask(&body.from_user_name);
    for account in &ACCOUNTS {
        for event in wechat::normalise(account.provider, "fuzz", &body) {
            let _ = event.kind().to_ascii_lowercase();
            match &event {
                Normalised::Delivery(e) => published(e, &encode_json(e)),
                Normalised::Recipient(e) => published(e, &encode_json(e)),
            }
        }
    }
}

fn published<T>(event: &T, body: &[u8])
where
    T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    match decode_json::<T>(body) {
        Ok(decoded) => assert_eq!(&decoded, event, "published event decodes to another"),
        Err(error) => panic!(
            "published event does not decode at the projector ({error}): {event:?} as {:?}",
            String::from_utf8_lossy(body)
        ),
    }
}

/// `callback_decrypt`: the first byte picks the account (modulo 3, in [`ACCOUNTS`]) and the
/// mode (the quotient, modulo 5); the other bytes are the mode's input.
///
/// 0. envelope: the body of an encrypted POST; its `Encrypt` is signed (as a genuine sender
///    would) and opened as the receiver does, and the plaintext parsed.
/// 1. ciphertext: the `Encrypt` (or WeCom's `echostr`) text itself.
/// 2. raw plaintext: encrypted as given (PKCS#7-padded to 32 only when not already a whole
///    number of 32-byte blocks), so the fuzzer controls prefix, length field, tail and padding.
/// 3. structured plaintext: 16-byte prefix, a control byte, a 2-byte message length, the
///    message and the appid tail; bit 0 of the control byte replaces the length field with the
///    next 4 bytes. Built and padded correctly, so decryption gets past the padding.
/// 4. round trip: the bytes are a message, encrypted into a reply and opened again.
pub fn callback_decrypt(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let index = usize::from(selector % 3);
    let (account, keys) = (&ACCOUNTS[index], &KEYS[index]);
    match (selector / 3) % 5 {
        0 => envelope(account, keys, rest),
        1 => ciphertext(account, keys, &String::from_utf8_lossy(rest)),
        2 => raw_plaintext(account, keys, rest),
        3 => structured(account, keys, rest),
        _ => round_trip(account, keys, rest),
    }
}

fn envelope(account: &Account, keys: &Keys, body: &[u8]) {
    let Ok(encrypt) = wechat::envelope_encrypt(body) else {
        return;
    };
    let (timestamp, nonce) = ("1714112445", "415670741");
    let signature = msg_signature(account.token, timestamp, nonce, &encrypt);
    assert!(signature_matches(&signature, &signature.to_uppercase()));
    assert!(!signature_matches(&signature, &encrypt));
    ciphertext(account, keys, &encrypt);
}

fn ciphertext(account: &Account, keys: &Keys, encrypt: &str) {
    // The receiver's WeCom echostr arrives through query decoding: spaces back to '+'.
    for encrypt in [encrypt.to_string(), encrypt.replace(' ', "+")] {
        let raw = keys.crypt.decrypt_raw(&encrypt);
        let opened = keys.crypt.decrypt(&encrypt);
        match (&raw, &opened) {
            (Ok(raw), Ok(message)) => {
                assert_eq!(&raw.message, message);
                assert_eq!(raw.receiver_id, account.receiver_id);
                wechat_body(message);
            }
            (Ok(raw), Err(error)) => {
                assert_eq!(error, &CryptoError::ReceiverMismatch);
                assert_ne!(raw.receiver_id, account.receiver_id);
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            (Err(_), Ok(_)) => panic!("decrypt opened what decrypt_raw refused"),
        }
    }
}

/// AES-256-CBC with the account's key and IV = key[..16], without padding: `data` must be a
/// whole number of blocks.
fn aes_encrypt(keys: &Keys, mut data: Vec<u8>) -> String {
    let len = data.len();
    let encrypted = cbc::Encryptor::<Aes256>::new_from_slices(&keys.key, &keys.key[..16])
        .expect("fixed key and IV lengths")
        .encrypt_padded::<NoPadding>(&mut data, len)
        .map(<[u8]>::to_vec)
        .expect("whole blocks");
    base64::engine::general_purpose::STANDARD.encode(encrypted)
}

fn raw_plaintext(account: &Account, keys: &Keys, plain: &[u8]) {
    let mut padded = plain.to_vec();
    if padded.is_empty() || !padded.len().is_multiple_of(32) {
        pkcs7_pad32(&mut padded);
    }
    let encrypt = aes_encrypt(keys, padded.clone());
    let opened = keys.crypt.decrypt_raw(&encrypt);
    if let Ok(d) = &opened {
        // What was opened is exactly what was sealed, field by field.
        let mut rebuilt = d.random_prefix.to_vec();
        rebuilt.extend_from_slice(
            &u32::try_from(d.message.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        rebuilt.extend_from_slice(&d.message);
        rebuilt.extend_from_slice(d.receiver_id.as_bytes());
        assert_eq!(Ok(rebuilt.as_slice()), pkcs7_unpad32(&padded));
    }
    ciphertext(account, keys, &encrypt);
}

fn structured(account: &Account, keys: &Keys, data: &[u8]) {
    let mut prefix = [0u8; 16];
    let n = data.len().min(16);
    prefix[..n].copy_from_slice(&data[..n]);
    let data = &data[n..];
    let (control, data) = data.split_first().map_or((0, data), |(&c, d)| (c, d));
    let (length_field, data) = if control & 1 == 1 && data.len() >= 4 {
        let (field, data) = data.split_at(4);
        (Some([field[0], field[1], field[2], field[3]]), data)
    } else {
        (None, data)
    };
    let (message_len, data) = match data {
        [hi, lo, data @ ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), data),
        _ => (0, data),
    };
    let (message, tail) = data.split_at(message_len.min(data.len()));
    let length = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut plain = prefix.to_vec();
    plain.extend_from_slice(&length_field.unwrap_or(length.to_be_bytes()));
    plain.extend_from_slice(message);
    plain.extend_from_slice(tail);
    pkcs7_pad32(&mut plain);
    let encrypt = aes_encrypt(keys, plain);
    let raw = keys.crypt.decrypt_raw(&encrypt);
    if length_field.is_none() {
        // A well-formed plaintext opens to its parts; the tail is the receiver id when UTF-8.
        match (std::str::from_utf8(tail), &raw) {
            (Ok(tail), Ok(d)) => {
                assert_eq!(d.random_prefix, prefix);
                assert_eq!(d.message, message);
                assert_eq!(d.receiver_id, tail);
                assert_eq!(
                    keys.crypt.decrypt(&encrypt).is_ok(),
                    tail == account.receiver_id
                );
            }
            (Err(_), Err(error)) => assert_eq!(error, &CryptoError::Malformed),
            (tail, raw) => panic!("well-formed plaintext: tail {tail:?}, opened {raw:?}"),
        }
    }
    ciphertext(account, keys, &encrypt);
}

fn round_trip(account: &Account, keys: &Keys, message: &[u8]) {
    let (timestamp, nonce) = ("1714112445", "415670741");
    let reply = keys
        .crypt
        .encrypted_reply_xml(account.token, message, timestamp, nonce);
    let encrypt = match wechat::envelope_encrypt(reply.as_bytes()) {
        Ok(encrypt) => encrypt,
        Err(error) => panic!("own reply has no readable Encrypt ({error}): {reply}"),
    };
    let signature = msg_signature(account.token, timestamp, nonce, &encrypt);
    assert!(
        reply.contains(&signature),
        "reply carries its msg_signature"
    );
    assert_eq!(keys.crypt.decrypt(&encrypt).as_deref(), Ok(message));
}
