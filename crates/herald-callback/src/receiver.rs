//! The HTTP side: WeChat and WeCom callback endpoints.
//!
//! Order of checks on every request: the account exists; the signature holds (WeChat: the URL
//! `signature`, then for an encrypted body the `msg_signature` over its `Encrypt`; WeCom: the
//! `msg_signature`); the timestamp is inside the window; the ciphertext decrypts and names this
//! account's appid/corpid. Only then is the body parsed. The answer is `success` once every
//! normalised event is confirmed by the broker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use herald_amqp::{Broker, Routing};
use herald_contract::{SCHEMA_VERSION, encode_json, headers};
use herald_store::Store;
use serde::Deserialize;
use tracing::Instrument;

use crate::crypto::{CryptoError, MsgCrypt, msg_signature, sha1_signature, signature_matches};
use crate::wechat::{self, Normalised, mask};
use crate::{
    CallbackError, CallbackSettings, EVENT_TYPE_HEADER, RECIPIENT_EVENT, SmsCallbackAccount, sms,
};

/// The longest the receiver waits for the trace context of the send a callback reports on
/// (it comes out of the answer's budget, `publish_timeout_ms`, and gets at most a quarter).
const TRACE_LOOKUP: Duration = Duration::from_millis(1000);
/// How often the receiver looks again for a send result not stored yet.
const TRACE_LOOKUP_POLL: Duration = Duration::from_millis(25);

pub(crate) struct WechatAccount {
    token: String,
    crypt: Option<MsgCrypt>,
}

pub(crate) struct WecomAccount {
    token: String,
    crypt: MsgCrypt,
}

pub(crate) struct Receiver {
    pub(crate) broker: Broker,
    pub(crate) store: Store,
    pub(crate) settings: CallbackSettings,
    wechat: HashMap<String, WechatAccount>,
    wecom: HashMap<String, WecomAccount>,
    sms: HashMap<String, SmsCallbackAccount>,
}

impl Receiver {
    /// Checks every account's EncodingAESKey up front: a bad key is a configuration error at
    /// start, not a 500 at the first callback.
    pub(crate) fn new(
        broker: Broker,
        store: Store,
        settings: CallbackSettings,
    ) -> Result<Self, CallbackError> {
        let mut wechat = HashMap::new();
        for (id, account) in &settings.wechat {
            let crypt = account
                .encoding_aes_key
                .as_deref()
                .filter(|k| !k.trim().is_empty())
                .map(|key| MsgCrypt::new(key, &account.appid))
                .transpose()
                .map_err(|e| {
                    CallbackError::Config(format!("callback.wechat.{id}.encoding_aes_key: {e}"))
                })?;
            wechat.insert(
                id.clone(),
                WechatAccount {
                    token: account.token.clone(),
                    crypt,
                },
            );
        }
        let mut wecom = HashMap::new();
        for (id, account) in &settings.wecom {
            let crypt = MsgCrypt::new(&account.encoding_aes_key, &account.corpid).map_err(|e| {
                CallbackError::Config(format!("callback.wecom.{id}.encoding_aes_key: {e}"))
            })?;
            wecom.insert(
                id.clone(),
                WecomAccount {
                    token: account.token.clone(),
                    crypt,
                },
            );
        }
        let mut sms = HashMap::new();
        for (id, account) in &settings.sms {
            if account.token.trim().len() < 16 {
                return Err(CallbackError::Config(format!(
                    "callback.sms.{id}.token: at least 16 characters (it is the receipts' only \
                     authentication)"
                )));
            }
            sms.insert(id.clone(), account.clone());
        }
        Ok(Self {
            broker,
            store,
            settings,
            wechat,
            wecom,
            sms,
        })
    }
}

/// The query of a callback request; every field is optional so a missing one is refused by
/// the checks below with a clear reason rather than by the extractor.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct CallbackQuery {
    #[serde(default)]
    signature: String,
    #[serde(default)]
    timestamp: String,
    #[serde(default)]
    nonce: String,
    #[serde(default)]
    echostr: Option<String>,
    #[serde(default)]
    encrypt_type: Option<String>,
    #[serde(default)]
    msg_signature: Option<String>,
}

/// Why a request was refused (the answer says it; WeChat retries anything but 200), and the
/// `outcome` it counts as in `herald_callback_requests_total`.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    outcome: &'static str,
}

impl Refusal {
    fn malformed(reason: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason,
            outcome: "malformed",
        }
    }

    fn bad_signature(reason: &'static str) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason,
            outcome: "bad_signature",
        }
    }

    fn stale() -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason: "stale timestamp",
            outcome: "stale",
        }
    }

    fn unknown_account() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            reason: "unknown account",
            outcome: "unknown_account",
        }
    }

    fn unconfigured(reason: &'static str) -> Self {
        Self {
            status: StatusCode::NOT_IMPLEMENTED,
            reason,
            outcome: "unconfigured",
        }
    }

    fn unavailable() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: "try again",
            outcome: "unavailable",
        }
    }

    /// Counts the refusal and answers it.
    fn answer(self, provider: &'static str, account: &str) -> Response {
        // An unknown account is whatever the caller put in the path: never a label value.
        let account = if self.outcome == "unknown_account" {
            "unknown"
        } else {
            account
        };
        count(provider, account, self.outcome);
        (self.status, self.reason).into_response()
    }
}

/// `herald_callback_requests_total{provider, account, outcome}`.
fn count(provider: &'static str, account: &str, outcome: &'static str) {
    metrics::counter!(
        "herald_callback_requests_total",
        "provider" => provider,
        "account" => account.to_string(),
        "outcome" => outcome,
    )
    .increment(1);
}

/// Query decoding turns `+` into a space; base64 has no spaces, so put them back.
fn base64_param(value: &str) -> String {
    value.replace(' ', "+")
}

impl Receiver {
    fn check_timestamp(&self, account: &str, timestamp: &str) -> Result<(), Refusal> {
        let Ok(timestamp) = timestamp.trim().parse::<i64>() else {
            return Err(Refusal::malformed("timestamp must be unix seconds"));
        };
        let skew = chrono::Utc::now()
            .timestamp()
            .saturating_sub(timestamp)
            .saturating_abs();
        if skew > self.settings.timestamp_window_secs {
            tracing::warn!(
                account,
                timestamp,
                "callback timestamp outside the window (replay?)"
            );
            return Err(Refusal::stale());
        }
        Ok(())
    }

    fn wechat_account(&self, account: &str) -> Result<&WechatAccount, Refusal> {
        self.wechat
            .get(account)
            .ok_or_else(Refusal::unknown_account)
    }

    fn wecom_account(&self, account: &str) -> Result<&WecomAccount, Refusal> {
        self.wecom.get(account).ok_or_else(Refusal::unknown_account)
    }

    /// WeChat's URL signature over (token, timestamp, nonce), then the timestamp window.
    fn check_url_signature(
        &self,
        account: &str,
        config: &WechatAccount,
        query: &CallbackQuery,
    ) -> Result<(), Refusal> {
        let expected = sha1_signature(&[&config.token, &query.timestamp, &query.nonce]);
        if !signature_matches(&expected, &query.signature) {
            tracing::warn!(account, "callback signature mismatch");
            return Err(Refusal::bad_signature("signature mismatch"));
        }
        self.check_timestamp(account, &query.timestamp)
    }

    /// `msg_signature` over an encrypted value, then decryption with the appid/corpid check.
    fn open(
        &self,
        account: &str,
        token: &str,
        crypt: &MsgCrypt,
        query: &CallbackQuery,
        encrypt: &str,
    ) -> Result<Vec<u8>, Refusal> {
        let Some(given) = query.msg_signature.as_deref() else {
            return Err(Refusal::bad_signature("msg_signature missing"));
        };
        let expected = msg_signature(token, &query.timestamp, &query.nonce, encrypt);
        if !signature_matches(&expected, given) {
            tracing::warn!(account, "callback msg_signature mismatch");
            return Err(Refusal::bad_signature("msg_signature mismatch"));
        }
        self.check_timestamp(account, &query.timestamp)?;
        crypt.decrypt(encrypt).map_err(|error| {
            tracing::warn!(account, %error, "callback does not decrypt");
            match error {
                CryptoError::ReceiverMismatch => Refusal::bad_signature("appid mismatch"),
                _ => Refusal::malformed("does not decrypt"),
            }
        })
    }
}

/// `GET /v1/callbacks/wechat/{account}`: URL verification (plain signature in every mode);
/// answers `echostr` verbatim.
pub(crate) async fn wechat_verify(
    State(receiver): State<Arc<Receiver>>,
    Path(account): Path<String>,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let checked = receiver
        .wechat_account(&account)
        .and_then(|config| receiver.check_url_signature(&account, config, &query));
    match checked {
        Ok(()) => {
            count("wechat", &account, "verified");
            query.echostr.unwrap_or_default().into_response()
        }
        Err(refusal) => refusal.answer("wechat", &account),
    }
}

/// `POST /v1/callbacks/wechat/{account}`: plain, compatible or safe mode.
pub(crate) async fn wechat_event(
    State(receiver): State<Arc<Receiver>>,
    Path(account): Path<String>,
    Query(query): Query<CallbackQuery>,
    body: Bytes,
) -> Response {
    let opened = (|| {
        let config = receiver.wechat_account(&account)?;
        // Signature first: nothing of an unauthenticated body is parsed.
        receiver.check_url_signature(&account, config, &query)?;
        match query.encrypt_type.as_deref() {
            None | Some("" | "raw") => Ok(body.to_vec()),
            Some("aes") => {
                // Compatible mode carries the plaintext too; only the encrypted part is
                // authenticated by msg_signature, so only it is used.
                let Some(crypt) = &config.crypt else {
                    tracing::warn!(%account, "encrypted callback, but no EncodingAESKey is configured");
                    return Err(Refusal::unconfigured(
                        "no EncodingAESKey configured for this account",
                    ));
                };
                let encrypt = wechat::envelope_encrypt(&body).map_err(|error| {
                    tracing::warn!(%account, %error, "encrypted callback without a readable Encrypt");
                    Refusal::malformed("no Encrypt")
                })?;
                receiver.open(&account, &config.token, crypt, &query, &encrypt)
            }
            Some(_) => Err(Refusal::malformed("unknown encrypt_type")),
        }
    })();
    match opened {
        Ok(plaintext) => {
            receiver
                .accept("wechat", &account, &plaintext, "success")
                .await
        }
        Err(refusal) => refusal.answer("wechat", &account),
    }
}

/// `GET /v1/callbacks/wecom/{account}`: URL verification: `msg_signature` over the encrypted
/// `echostr`, which is decrypted and its plaintext answered.
pub(crate) async fn wecom_verify(
    State(receiver): State<Arc<Receiver>>,
    Path(account): Path<String>,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let opened = receiver.wecom_account(&account).and_then(|config| {
        let echostr = base64_param(query.echostr.as_deref().unwrap_or_default());
        receiver.open(&account, &config.token, &config.crypt, &query, &echostr)
    });
    match opened {
        Ok(plaintext) => {
            count("wecom", &account, "verified");
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; charset=utf-8",
                )],
                plaintext,
            )
                .into_response()
        }
        Err(refusal) => refusal.answer("wecom", &account),
    }
}

/// `POST /v1/callbacks/wecom/{account}`: always encrypted.
pub(crate) async fn wecom_event(
    State(receiver): State<Arc<Receiver>>,
    Path(account): Path<String>,
    Query(query): Query<CallbackQuery>,
    body: Bytes,
) -> Response {
    let opened = receiver.wecom_account(&account).and_then(|config| {
        // WeCom signs only the ciphertext, so the envelope's Encrypt is read first; nothing
        // else of the body is looked at before the signature over it holds.
        let encrypt = wechat::envelope_encrypt(&body).map_err(|error| {
            tracing::warn!(%account, %error, "WeCom callback without a readable Encrypt");
            Refusal::malformed("no Encrypt")
        })?;
        receiver.open(&account, &config.token, &config.crypt, &query, &encrypt)
    });
    match opened {
        // WeCom: an empty answer acknowledges without a passive reply.
        Ok(plaintext) => receiver.accept("wecom", &account, &plaintext, "").await,
        Err(refusal) => refusal.answer("wecom", &account),
    }
}

/// `POST /v1/callbacks/sms/{account}`: an SMS provider's delivery receipts. Neither Tencent
/// nor Aliyun signs them: the account's secret must come as `?token=` or as the HTTP Basic
/// password, else 401 (counted as `unauthenticated`) before anything of the body is read.
pub(crate) async fn sms_receipt(
    State(receiver): State<Arc<Receiver>>,
    Path(account): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    const PROVIDER: &str = "sms";
    let Some(config) = receiver.sms.get(&account) else {
        return Refusal::unknown_account().answer(PROVIDER, &account);
    };
    let provider = config.provider.label();
    let given = query
        .get("token")
        .cloned()
        .or_else(|| basic_password(&headers));
    if !given
        .as_deref()
        .is_some_and(|token| sms::secret_matches(&config.token, token))
    {
        tracing::warn!(
            provider,
            account,
            with_token = given.is_some(),
            "SMS receipt without the account's secret; refused"
        );
        count(provider, &account, "unauthenticated");
        return (
            StatusCode::UNAUTHORIZED,
            [(
                axum::http::header::WWW_AUTHENTICATE,
                "Basic realm=\"herald\"",
            )],
            "unauthenticated",
        )
            .into_response();
    }
    let events = match sms::normalise(config.provider, &account, &body) {
        Ok(events) => events,
        Err(error) => {
            tracing::warn!(provider, account, %error, "unparseable SMS receipt");
            return Refusal::malformed("malformed body").answer(provider, &account);
        }
    };
    let ack = config.provider.ack();
    receiver
        .publish_events(provider, &account, events, || {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                ack,
            )
                .into_response()
        })
        .await
}

/// The password of an HTTP Basic `Authorization` header.
fn basic_password(headers: &axum::http::HeaderMap) -> Option<String> {
    use base64::Engine;
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_string())
}

impl Receiver {
    /// Parses an authenticated body, publishes its events with confirms, answers `ack`.
    async fn accept(
        &self,
        provider: &'static str,
        account: &str,
        plaintext: &[u8],
        ack: &'static str,
    ) -> Response {
        let body = match wechat::parse(plaintext) {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!(provider, account, %error, "unparseable callback body");
                return Refusal::malformed("malformed body").answer(provider, account);
            }
        };
        let events = wechat::normalise(provider, account, &body);
        if events.is_empty() {
            tracing::info!(
                provider,
                account,
                msg_type = %body.msg_type,
                event = %body.event,
                from = %mask(&body.from_user_name),
                "callback not acted on; acknowledged"
            );
            count(provider, account, "accepted");
            return ack.into_response();
        }
        self.publish_events(provider, account, events, || ack.into_response())
            .await
    }

    /// Publishes normalised events with confirms; answers `ack()` once the broker has them all.
    async fn publish_events(
        &self,
        provider: &'static str,
        account: &str,
        events: Vec<Normalised>,
        ack: impl Fn() -> Response,
    ) -> Response {
        if events.is_empty() {
            count(provider, account, "accepted");
            return ack();
        }
        // Everything from here to the answer shares one budget, under the provider's 5 s.
        let budget = Duration::from_millis(self.settings.publish_timeout_ms);
        let deadline = tokio::time::Instant::now() + budget;
        let span = tracing::info_span!(
            "callback",
            otel.name = %format!("POST /v1/callbacks/{provider}/{{account}}"),
            otel.kind = "server",
            herald.provider_account = %account,
            herald.provider_msgid = tracing::field::Empty,
            herald.event = %events[0].kind(),
        );
        // Continue the trace of the send this callback reports on (the parent must be set
        // before the span is first entered). A fast provider can call back before the sender
        // has stored the send's msgid: look again briefly until it is there.
        if let Some(Normalised::Delivery(first)) = events.first() {
            span.record("herald.provider_msgid", first.provider_msgid.as_str());
            // Best effort and bounded: a busy database must not eat into the provider's 5 s.
            let lookup = async {
                loop {
                    match self
                        .store
                        .traceparent_for_msgid(account, &first.provider_msgid)
                        .await
                    {
                        Ok(Some(traceparent)) => return Some(traceparent),
                        Ok(None) => tokio::time::sleep(TRACE_LOOKUP_POLL).await,
                        Err(_) => return None,
                    }
                }
            };
            let wait = TRACE_LOOKUP.min(budget / 4);
            if let Ok(Some(traceparent)) = tokio::time::timeout(wait, lookup).await {
                herald_telemetry::set_parent_traceparent(&span, &traceparent);
            }
        }
        let published = tokio::time::timeout_at(deadline, publish_all(&self.broker, &events))
            .instrument(span.clone())
            .await;
        match published {
            // `success` only once every event is safely with the broker.
            Ok(Ok(())) => {
                tracing::debug!(parent: &span, events = events.len(), "callback published");
                count(provider, account, "accepted");
                ack()
            }
            Ok(Err(error)) => {
                tracing::error!(parent: &span, %error, "could not publish callback events; the provider will retry");
                Refusal::unavailable().answer(provider, account)
            }
            Err(_) => {
                tracing::error!(parent: &span, ?budget, "broker confirm too slow; the provider will retry");
                Refusal::unavailable().answer(provider, account)
            }
        }
    }
}

async fn publish_all(broker: &Broker, events: &[Normalised]) -> Result<(), herald_amqp::AmqpError> {
    let publisher = broker.publisher();
    let exchange = broker.topology().events_exchange();
    let publishes = events.iter().map(|event| {
        let mut header_map = vec![(
            headers::SCHEMA_VERSION.to_string(),
            SCHEMA_VERSION.to_string(),
        )];
        header_map.extend(herald_telemetry::trace_headers());
        let (provider, body) = match event {
            Normalised::Delivery(e) => (e.provider.as_str(), encode_json(e)),
            Normalised::Recipient(e) => {
                header_map.push((EVENT_TYPE_HEADER.to_string(), RECIPIENT_EVENT.to_string()));
                (e.provider.as_str(), encode_json(e))
            }
        };
        let routing_key = format!("{provider}.{}", event.kind().to_ascii_lowercase());
        let (publisher, exchange) = (publisher.clone(), exchange.clone());
        async move {
            publisher
                .publish_json(
                    &exchange,
                    &routing_key,
                    &body,
                    header_map,
                    Routing::Required,
                )
                .await
        }
    });
    futures::future::join_all(publishes)
        .await
        .into_iter()
        .collect()
}
