//! Outbound webhooks, shared by the callback service's status webhooks and the sender's
//! `webhook` channel:
//!
//! - [`sign`]: the [Standard Webhooks](https://www.standardwebhooks.com/) scheme: `whsec_`
//!   secrets, `webhook-signature: v1,<base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>"))>`,
//!   several space-separated signatures while secrets rotate;
//! - [`target`]: the SSRF guard: which addresses are public, an operator's allow-list, and a
//!   reqwest client whose resolver refuses every other address at connect time (so a name
//!   cannot resolve to a public address when checked and to a private one when connected),
//!   that follows no redirects and uses no proxy; plus a bounded read of an answer.

pub mod sign;
pub mod target;

pub use sign::{Secret, SecretError, signature, signature_header};
pub use target::{Allow, AllowError, Refused, TargetError};
