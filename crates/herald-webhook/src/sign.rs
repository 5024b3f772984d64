//! Standard Webhooks signatures.
//!
//! A secret is `whsec_` followed by the base64 of the HMAC key (the prefix is optional on
//! input, and padding may be left out, as the reference libraries accept). A request carries
//! `webhook-id`, `webhook-timestamp` (unix seconds) and `webhook-signature`, which is
//! `v1,<base64 signature>` per secret, separated by spaces: during a rotation the receiver
//! may know either secret, and any one matching signature verifies.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Standard base64, padded or not.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub const PREFIX: &str = "whsec_";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the secret is not `whsec_` followed by base64")]
    NotBase64,
    #[error("the secret is empty")]
    Empty,
}

/// A signing secret: the HMAC key of a `whsec_<base64>` string. Its `Debug` shows no key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(whsec_***)")
    }
}

impl Secret {
    /// Parses `whsec_<base64>` (or the bare base64).
    pub fn parse(secret: &str) -> Result<Self, SecretError> {
        let encoded = secret.trim();
        let encoded = encoded.strip_prefix(PREFIX).unwrap_or(encoded);
        let key = LENIENT
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Self { key })
    }

    /// A secret from raw key bytes.
    pub fn from_key(key: impl Into<Vec<u8>>) -> Result<Self, SecretError> {
        let key = key.into();
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Self { key })
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// `v1,<base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>"))>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        signature(&self.key, id, timestamp, body)
    }
}

/// `v1,<base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>"))>` for a raw key.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length: this never fails.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The `webhook-signature` header: one `v1,` signature per secret, space-separated.
pub fn signature_header(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn the_specifications_example_signs_as_published() {
        let secret = Secret::parse(SPEC_SECRET).expect("secret");
        assert_eq!(
            secret.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY),
            SPEC_SIGNATURE
        );
        // The prefix is optional.
        let bare = Secret::parse(SPEC_SECRET.trim_start_matches(PREFIX)).expect("bare");
        assert_eq!(bare, secret);
    }

    #[test]
    fn rotation_sends_one_signature_per_secret() {
        let old = Secret::parse(SPEC_SECRET).expect("old");
        let new = Secret::parse("whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24").expect("unpadded");
        let header = signature_header(
            &[old.clone(), new.clone()],
            SPEC_ID,
            SPEC_TIMESTAMP,
            SPEC_BODY,
        );
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], SPEC_SIGNATURE);
        assert_eq!(parts[1], new.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY));
        assert_ne!(parts[0], parts[1]);
        assert_eq!(new.key(), b"second-secret-for-rotation");
    }

    #[test]
    fn bad_secrets_are_refused_and_never_shown() {
        assert_eq!(Secret::parse("whsec_!!"), Err(SecretError::NotBase64));
        assert_eq!(Secret::parse("whsec_"), Err(SecretError::Empty));
        let shown = format!("{:?}", Secret::parse(SPEC_SECRET).expect("secret"));
        assert!(!shown.contains("MfKQ"), "{shown}");
    }
}
