//! E-mail over SMTP: lettre's tokio transport with its connection pool, one per provider account
//! (`[sender.smtp.<account>]`), STARTTLS, implicit TLS (rustls) or plain SMTP for a local relay.
//!
//! The rendered payload is the `email` variant's `{subject, html, text}`: the message is a
//! `multipart/alternative` of the text and HTML parts when both are there, else the one part.
//! Its `Message-ID` is `<delivery-id@herald>`, the same on every attempt, with the delivery id
//! again in `X-Herald-Delivery-Id`, so the recipient's mail system (and a person reading the
//! headers) can tell a retried message from a new one.
//!
//! The SMTP reply classifies the attempt: 2xx sent; 4xx retry; 5xx on the recipient (550, 551,
//! 552, 553, or an `x.1.x`/`x.2.x` enhanced status) failed for that recipient; 5xx on
//! authentication (530, 534, 535, 538) failed as configuration, with an alert; other 5xx failed
//! as unknown, with an alert. A connection that cannot be made, drops or times out retries and
//! feeds the account's breaker; a TLS failure (handshake, certificate) is configuration.

use std::collections::BTreeMap;
use std::error::Error as _;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use herald_contract::v1::DeliveryJob;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::{Error as SmtpError, PoolConfig};
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::channel::{Attempt, Channel, FailureKind, NarrowerLimit};
use crate::limit::RateLimit;
use crate::meters;

/// The header carrying the delivery id (the `Message-ID` carries it too).
pub const DELIVERY_ID_HEADER: &str = "X-Herald-Delivery-Id";

/// How the connection to the SMTP server is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain connection upgraded with `STARTTLS`, which must succeed (submission, port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (submissions, port 465).
    Implicit,
    /// No TLS: only for a relay on the same host or network (a local Postfix, the dev stack).
    None,
}

impl SmtpTls {
    fn default_port(self) -> u16 {
        match self {
            SmtpTls::Starttls => 587,
            SmtpTls::Implicit => 465,
            SmtpTls::None => 25,
        }
    }
}

/// `[sender.smtp."<account>"]`: one SMTP provider account. The password comes from the
/// environment or a secret store in production (`HERALD_SENDER__SMTP__<ID>__PASSWORD`) and is
/// never logged (the settings print it as `***`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SmtpSettings {
    pub host: String,
    /// Default: 587 for `starttls`, 465 for `implicit`, 25 for `none`.
    pub port: Option<u16>,
    pub tls: SmtpTls,
    /// Both or neither: no authentication without them.
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sender, `Shop <no-reply@shop.example>`.
    pub from: String,
    /// The name given in `EHLO`; default: this host's name.
    pub hello_name: Option<String>,
    /// A PEM file with a private CA's certificate to trust besides the platform's roots (a
    /// relay inside the company network).
    pub ca_file: Option<String>,
    /// Connections open to the server at once (sends beyond wait for one), and idle ones kept
    /// for reuse: relays cap a client's concurrent connections (Exchange Online: 3).
    pub pool_size: u32,
    /// Bound on connecting and on each SMTP command.
    pub timeout_ms: u64,
    /// What one recipient domain may receive from this account, for receivers that throttle
    /// or greylist a busy sender (large mailbox providers): `domain_rate_limits` by domain
    /// (`"qq.com" = { per_second = 5 }`), `domain_rate_limit` for every other one (none by
    /// default). The domain is the address's, lower-cased.
    pub domain_rate_limit: Option<RateLimit>,
    pub domain_rate_limits: BTreeMap<String, RateLimit>,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            host: String::new(),
            port: None,
            tls: SmtpTls::default(),
            username: None,
            password: None,
            from: String::new(),
            hello_name: None,
            ca_file: None,
            pool_size: 4,
            timeout_ms: 30_000,
            domain_rate_limit: None,
            domain_rate_limits: BTreeMap::new(),
        }
    }
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("from", &self.from)
            .field("hello_name", &self.hello_name)
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("timeout_ms", &self.timeout_ms)
            .field("domain_rate_limit", &self.domain_rate_limit)
            .field("domain_rate_limits", &self.domain_rate_limits)
            .finish()
    }
}

/// What an SMTP failure means for the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Transient; `provider_down` when the server itself is unreachable or closing.
    Retry { provider_down: bool },
    /// Will not succeed as sent.
    Permanent(FailureKind),
}

/// An RFC 3463 enhanced status code (`5.1.1`) at the start of a reply's text.
fn enhanced_status(text: &str) -> Option<(u16, u16, u16)> {
    let token = text.split_whitespace().next()?;
    let mut parts = token.split('.').map(|p| p.parse::<u16>().ok());
    let class = parts.next()??;
    let subject = parts.next()??;
    let detail = parts.next()??;
    (parts.next().is_none() && (2..=5).contains(&class)).then_some((class, subject, detail))
}

/// The reply table: an SMTP reply code (with the enhanced status code at the start of its
/// text, when the server sends one) to what the attempt came to. Only negative replies come
/// here; the caller has already taken 2xx as sent.
pub fn classify_reply(code: u16, text: &str) -> Outcome {
    let enhanced = enhanced_status(text);
    match code {
        // Service not available, closing the channel: the server is going away.
        421 => Outcome::Retry {
            provider_down: true,
        },
        // Mailbox busy, local error (greylisting), insufficient storage, temporary auth
        // failure: the server is up and asks us to come back.
        400..=499 => Outcome::Retry {
            provider_down: false,
        },
        // Authentication required, mechanism too weak, credentials invalid, encryption
        // required: the account's settings.
        530 | 534 | 535 | 538 => Outcome::Permanent(FailureKind::Config),
        // Message too big (552 5.3.4): the content, not the mailbox.
        552 if enhanced.is_some_and(|(_, subject, _)| subject == 3) => {
            Outcome::Permanent(FailureKind::Template)
        }
        // Mailbox unavailable or unknown, user not local, mailbox full, name not allowed.
        550..=553 => Outcome::Permanent(FailureKind::Recipient),
        // Other refusals that name the address (x.1.x) or the mailbox (x.2.x) as the cause.
        500..=599 if enhanced.is_some_and(|(_, subject, _)| subject == 1 || subject == 2) => {
            Outcome::Permanent(FailureKind::Recipient)
        }
        _ => Outcome::Permanent(FailureKind::Unknown),
    }
}

/// A failure without an SMTP reply: the connection, TLS, or the client.
pub fn classify_transport(error: &SmtpError) -> Outcome {
    if error.is_tls() || has_rustls_error(error) {
        // A handshake refused or a certificate not trusted does not heal on a retry.
        return Outcome::Permanent(FailureKind::Config);
    }
    if error.is_client() {
        // STARTTLS not offered, no authentication mechanism in common: the settings.
        return Outcome::Permanent(FailureKind::Config);
    }
    if error.is_transport_shutdown() {
        return Outcome::Retry {
            provider_down: false,
        };
    }
    // Connection refused or reset, timeouts, an unparsable reply.
    Outcome::Retry {
        provider_down: true,
    }
}

/// lettre reports a failed TLS handshake as a connection error wrapping an `io::Error` that
/// wraps rustls' error; `io::Error::source` skips the wrapped error itself, so look inside.
fn has_rustls_error(error: &SmtpError) -> bool {
    let mut source = error.source();
    while let Some(cause) = source {
        if cause.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// `sh…@example.com`: the first two characters of the local part and the domain, for logs and
/// stored error messages.
pub fn mask_address(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => {
            let head: String = local.chars().take(2).collect();
            format!("{head}…@{domain}")
        }
        None => address.chars().take(2).chain(['…']).collect(),
    }
}

/// The `Message-ID` of a delivery's message, the same on every attempt.
pub fn message_id(delivery_id: Uuid) -> String {
    format!("<{delivery_id}@herald>")
}

/// Builds the message for `to` from the rendered payload; `Err` is what is wrong with the
/// payload.
pub fn build_message(
    from: &Mailbox,
    to: Address,
    payload: &Value,
    delivery_id: Uuid,
) -> Result<Message, String> {
    let field = |name: &str| payload.get(name).and_then(Value::as_str);
    let subject = field("subject").ok_or("payload: no subject")?;
    let builder = Message::builder()
        .from(from.clone())
        .to(Mailbox::new(None, to))
        .subject(subject)
        .message_id(Some(message_id(delivery_id)))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str(DELIVERY_ID_HEADER),
            delivery_id.to_string(),
        ));
    let built = match (field("text"), field("html")) {
        (Some(text), Some(html)) => builder.multipart(MultiPart::alternative_plain_html(
            text.to_string(),
            html.to_string(),
        )),
        (Some(text), None) => builder.singlepart(SinglePart::plain(text.to_string())),
        (None, Some(html)) => builder.singlepart(SinglePart::html(html.to_string())),
        (None, None) => return Err("payload: neither text nor html".into()),
    };
    built.map_err(|e| format!("payload: {e}"))
}

/// One account's pooled transport and sender.
struct Account {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// lettre's pool bounds idle connections only: this bounds open ones.
    connections: tokio::sync::Semaphore,
    from: Mailbox,
    host: String,
    domain_rate_limit: Option<RateLimit>,
    domain_rate_limits: BTreeMap<String, RateLimit>,
}

impl Account {
    fn new(id: &str, settings: &SmtpSettings) -> Result<Self, String> {
        let at = |what: &str| format!("sender.smtp.{id}.{what}");
        if settings.host.is_empty() {
            return Err(format!("{}: not set", at("host")));
        }
        let from: Mailbox = settings
            .from
            .parse()
            .map_err(|e| format!("{}: `{}`: {e}", at("from"), settings.from))?;
        let tls = match settings.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::Starttls | SmtpTls::Implicit => {
                let mut parameters = TlsParameters::builder(settings.host.clone());
                if let Some(file) = &settings.ca_file {
                    let pem = std::fs::read(file)
                        .map_err(|e| format!("{}: `{file}`: {e}", at("ca_file")))?;
                    let certificate = Certificate::from_pem(&pem)
                        .map_err(|e| format!("{}: `{file}`: {e}", at("ca_file")))?;
                    parameters = parameters.add_root_certificate(certificate);
                }
                let parameters = parameters
                    .build_rustls()
                    .map_err(|e| format!("{}: {e}", at("tls")))?;
                if settings.tls == SmtpTls::Implicit {
                    Tls::Wrapper(parameters)
                } else {
                    Tls::Required(parameters)
                }
            }
        };
        let timeout = Duration::from_millis(settings.timeout_ms.max(1));
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host)
            .port(settings.port.unwrap_or(settings.tls.default_port()))
            .tls(tls)
            .timeout(Some(timeout))
            .pool_config(
                PoolConfig::new()
                    .max_size(settings.pool_size.max(1))
                    .idle_timeout(Duration::from_secs(60)),
            );
        match (&settings.username, &settings.password) {
            (Some(username), Some(password)) => {
                builder = builder.credentials(Credentials::new(username.clone(), password.clone()));
            }
            (None, None) => {}
            _ => {
                return Err(format!(
                    "{}: username and password go together",
                    at("username")
                ));
            }
        }
        if let Some(name) = &settings.hello_name {
            builder = builder.hello_name(ClientId::Domain(name.clone()));
        }
        Ok(Self {
            transport: builder.build(),
            connections: tokio::sync::Semaphore::new(
                usize::try_from(settings.pool_size.max(1)).unwrap_or(1),
            ),
            from,
            host: settings.host.clone(),
            domain_rate_limit: settings.domain_rate_limit,
            domain_rate_limits: settings
                .domain_rate_limits
                .iter()
                .map(|(domain, limit)| (domain.to_ascii_lowercase(), *limit))
                .collect(),
        })
    }

    /// Sends over one of at most `pool_size` connections.
    async fn send(&self, message: Message) -> Result<Response, SmtpError> {
        // The semaphore is never closed, so the permit always comes.
        let _permit = self.connections.acquire().await.ok();
        self.transport.send(message).await
    }
}

/// The `email` channel.
pub struct Email {
    accounts: BTreeMap<String, Account>,
}

impl Email {
    /// Builds a pooled transport per account (no connection is opened yet). Needs a tokio
    /// runtime: the pool starts its idle-connection reaper.
    pub fn new(smtp: &BTreeMap<String, SmtpSettings>) -> Result<Self, String> {
        let accounts = smtp
            .iter()
            .map(|(id, settings)| Account::new(id, settings).map(|a| (id.clone(), a)))
            .collect::<Result<_, _>>()?;
        Ok(Self { accounts })
    }

    async fn attempt(&self, job: &DeliveryJob, delivery_id: Uuid) -> Attempt {
        let Some(account) = self.accounts.get(&job.provider_account) else {
            return Attempt::failed(
                "config",
                format!(
                    "no [sender.smtp.{}] configured for this account",
                    job.provider_account
                ),
                FailureKind::Config,
            );
        };
        let masked = mask_address(&job.recipient);
        let to: Address = match job.recipient.parse() {
            Ok(to) => to,
            Err(e) => {
                return Attempt::failed(
                    "address",
                    format!("recipient {masked}: {e}"),
                    FailureKind::Recipient,
                );
            }
        };
        let payload = job
            .payload
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or_default();
        let message = match build_message(&account.from, to, &payload, delivery_id) {
            Ok(message) => message,
            Err(why) => {
                return Attempt::failed("payload", why, FailureKind::Template);
            }
        };
        let started = std::time::Instant::now();
        let sent = account
            .send(message)
            .instrument(tracing::info_span!(
                "SMTP",
                otel.name = "SMTP send",
                otel.kind = "client",
                server.address = %account.host,
                herald.recipient = %masked,
            ))
            .await;
        meters::provider_call(&job.channel, started.elapsed());
        let error = match sent {
            Ok(response) => {
                meters::provider_answer("smtp", &u16::from(response.code()).to_string());
                tracing::debug!(code = %response.code(), reply = %response.message().collect::<Vec<_>>().join(" "), recipient = %masked, "SMTP server accepted the message");
                return Attempt::Sent(message_id(delivery_id));
            }
            Err(error) => error,
        };
        // Servers often echo the address in their reply; stored messages and logs get the
        // masked form.
        let text = error.to_string().replace(&job.recipient, &masked);
        let (code, outcome) = match error.status() {
            Some(code) => {
                let reply = error.source().map(|s| s.to_string()).unwrap_or_default();
                let code = u16::from(code);
                (code.to_string(), classify_reply(code, &reply))
            }
            None if error.is_timeout() => ("timeout".to_string(), classify_transport(&error)),
            None => {
                let outcome = classify_transport(&error);
                let code = match outcome {
                    Outcome::Permanent(FailureKind::Config) if error.is_client() => "client",
                    Outcome::Permanent(_) => "tls",
                    Outcome::Retry { .. } => "transport",
                };
                (code.to_string(), outcome)
            }
        };
        meters::provider_answer("smtp", &code);
        match outcome {
            Outcome::Retry { provider_down } => Attempt::Retry {
                code,
                message: text,
                provider_down,
            },
            Outcome::Permanent(kind) => Attempt::failed(code, text, kind),
        }
    }
}

impl Channel for Email {
    fn name(&self) -> &'static str {
        herald_contract::channels::EMAIL
    }

    fn provider(&self) -> &'static str {
        "smtp"
    }

    fn narrower_limits(&self, job: &DeliveryJob) -> Vec<NarrowerLimit> {
        let Some(account) = self.accounts.get(&job.provider_account) else {
            return Vec::new();
        };
        let Some((_, domain)) = job.recipient.rsplit_once('@') else {
            return Vec::new();
        };
        let domain = domain.trim_end_matches('>').to_ascii_lowercase();
        let limit = account
            .domain_rate_limits
            .get(&domain)
            .copied()
            .or(account.domain_rate_limit);
        limit
            .map(|limit| NarrowerLimit {
                scope: "domain",
                id: domain,
                limit,
            })
            .into_iter()
            .collect()
    }

    fn send<'a>(
        &'a self,
        job: &'a DeliveryJob,
        delivery_id: Uuid,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(self.attempt(job, delivery_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reply_table() {
        let retry = |provider_down| Outcome::Retry { provider_down };
        let failed = Outcome::Permanent;
        for (code, text, outcome) in [
            (421, "4.3.2 Service shutting down", retry(true)),
            (450, "4.2.1 Mailbox busy", retry(false)),
            (451, "4.3.0 try later", retry(false)),
            (452, "4.5.3 Too many recipients", retry(false)),
            (454, "4.7.0 Temporary authentication failure", retry(false)),
            (550, "5.1.1 No such user", failed(FailureKind::Recipient)),
            (551, "User not local", failed(FailureKind::Recipient)),
            (552, "5.2.2 Mailbox full", failed(FailureKind::Recipient)),
            (552, "5.3.4 Message too big", failed(FailureKind::Template)),
            (
                553,
                "5.1.3 Bad address syntax",
                failed(FailureKind::Recipient),
            ),
            (554, "5.1.1 Unknown user", failed(FailureKind::Recipient)),
            (
                535,
                "5.7.8 Authentication credentials invalid",
                failed(FailureKind::Config),
            ),
            (
                530,
                "5.7.0 Authentication required",
                failed(FailureKind::Config),
            ),
            (
                538,
                "5.7.11 Encryption required",
                failed(FailureKind::Config),
            ),
            (
                554,
                "5.7.1 Message rejected as spam",
                failed(FailureKind::Unknown),
            ),
            (500, "Command unrecognized", failed(FailureKind::Unknown)),
        ] {
            assert_eq!(classify_reply(code, text), outcome, "{code} {text}");
        }
    }

    #[test]
    fn enhanced_status_codes() {
        assert_eq!(enhanced_status("5.1.1 No such user"), Some((5, 1, 1)));
        assert_eq!(enhanced_status("4.7.11 x"), Some((4, 7, 11)));
        assert_eq!(enhanced_status("No such user"), None);
        assert_eq!(enhanced_status("1.2.3.4 x"), None);
        assert_eq!(enhanced_status(""), None);
    }

    #[test]
    fn addresses_are_masked() {
        assert_eq!(mask_address("busy@shop.example"), "bu…@shop.example");
        assert_eq!(mask_address("a@b.example"), "a…@b.example");
        assert_eq!(mask_address("no-at-sign"), "no…");
    }

    #[test]
    fn settings_never_show_the_password() {
        let settings = SmtpSettings {
            host: "smtp.example".into(),
            username: Some("shop".into()),
            password: Some("hunter2-secret".into()),
            from: "Shop <no-reply@shop.example>".into(),
            ..Default::default()
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }

    fn from() -> Mailbox {
        "Shop <no-reply@shop.example>".parse().expect("mailbox")
    }

    fn to() -> Address {
        "li@example.com".parse().expect("address")
    }

    #[test]
    fn messages_carry_both_parts_and_the_delivery_id() {
        let id = Uuid::now_v7();
        let payload =
            json!({"subject": "Order A-1", "text": "plain body", "html": "<p>html body</p>"});
        let message = build_message(&from(), to(), &payload, id).expect("builds");
        let raw = String::from_utf8(message.formatted()).expect("utf-8");
        assert!(raw.contains(&format!("Message-ID: <{id}@herald>")), "{raw}");
        assert!(
            raw.contains(&format!("X-Herald-Delivery-Id: {id}")),
            "{raw}"
        );
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(
            raw.contains("text/plain") && raw.contains("text/html"),
            "{raw}"
        );
        assert!(raw.contains("Subject: Order A-1"), "{raw}");
        // Only the parts present.
        let payload = json!({"subject": "s", "text": "plain only"});
        let raw = String::from_utf8(
            build_message(&from(), to(), &payload, id)
                .expect("builds")
                .formatted(),
        )
        .expect("utf-8");
        assert!(
            !raw.contains("multipart") && !raw.contains("text/html"),
            "{raw}"
        );
        assert!(raw.contains("text/plain"), "{raw}");
        assert!(
            build_message(&from(), to(), &json!({"subject": "s"}), id).is_err(),
            "a body is required"
        );
        assert!(build_message(&from(), to(), &json!({"text": "t"}), id).is_err());
    }

    #[test]
    fn account_settings_are_checked() {
        let bad_from = SmtpSettings {
            host: "smtp.example".into(),
            from: "not an address".into(),
            ..Default::default()
        };
        let error = Account::new("shop", &bad_from).err().expect("refused");
        assert!(error.contains("sender.smtp.shop.from"), "{error}");
        let half_credentials = SmtpSettings {
            host: "smtp.example".into(),
            from: "no-reply@shop.example".into(),
            username: Some("shop".into()),
            ..Default::default()
        };
        assert!(Account::new("shop", &half_credentials).is_err());
    }

    /// A server that accepts connections and never answers: each send holds its connection
    /// (until the server closes it), so a third send waits for one of the first two.
    #[tokio::test]
    async fn connections_at_once_are_capped_by_the_pool_size() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (accepted, mut connections) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = accepted.send(stream);
            }
        });
        let account = std::sync::Arc::new(
            Account::new(
                "capped",
                &SmtpSettings {
                    host: "127.0.0.1".into(),
                    port: Some(port),
                    tls: SmtpTls::None,
                    from: "no-reply@shop.example".into(),
                    pool_size: 2,
                    timeout_ms: 20_000,
                    ..Default::default()
                },
            )
            .expect("builds"),
        );
        let message = build_message(
            &from(),
            to(),
            &json!({"subject": "s", "text": "t"}),
            Uuid::now_v7(),
        )
        .expect("builds");
        let sends: Vec<_> = (0..3)
            .map(|_| {
                let (account, message) = (account.clone(), message.clone());
                tokio::spawn(async move { account.send(message).await })
            })
            .collect();
        async fn next(
            connections: &mut tokio::sync::mpsc::UnboundedReceiver<tokio::net::TcpStream>,
        ) -> tokio::net::TcpStream {
            tokio::time::timeout(Duration::from_secs(10), connections.recv())
                .await
                .expect("a connection in time")
                .expect("listener running")
        }
        let first = next(&mut connections).await;
        let second = next(&mut connections).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), connections.recv())
                .await
                .is_err(),
            "a third connection while two are open"
        );
        // The server hangs up on the first: that send fails and the third one connects.
        drop(first);
        let third = next(&mut connections).await;
        drop((second, third));
        for send in sends {
            let result = send.await.expect("send task");
            assert!(result.is_err(), "nothing was sent: {result:?}");
        }
    }

    /// A server speaking plain SMTP to a client expecting implicit TLS: the handshake fails,
    /// which is configuration, not a provider outage.
    #[tokio::test]
    async fn tls_failures_are_configuration_and_refused_connections_retry() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(b"220 plain.example ESMTP\r\n").await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let settings = |tls, port| SmtpSettings {
            host: "localhost".into(),
            port: Some(port),
            tls,
            from: "no-reply@shop.example".into(),
            timeout_ms: 2_000,
            ..Default::default()
        };
        let message = build_message(
            &from(),
            to(),
            &json!({"subject": "s", "text": "t"}),
            Uuid::now_v7(),
        )
        .expect("builds");
        let account = Account::new("tls", &settings(SmtpTls::Implicit, port)).expect("builds");
        let error = account
            .transport
            .send(message.clone())
            .await
            .expect_err("no TLS there");
        assert_eq!(
            classify_transport(&error),
            Outcome::Permanent(FailureKind::Config),
            "{error:?}"
        );

        // Nothing listening at all.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let account = Account::new("down", &settings(SmtpTls::None, closed)).expect("builds");
        let error = account
            .transport
            .send(message)
            .await
            .expect_err("nothing listening");
        assert_eq!(
            classify_transport(&error),
            Outcome::Retry {
                provider_down: true
            },
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_domain_limit_applies_by_the_recipients_domain() {
        let named = RateLimit {
            per_second: 5.0,
            burst: 1,
        };
        let others = RateLimit {
            per_second: 20.0,
            burst: 1,
        };
        let mut smtp = BTreeMap::new();
        smtp.insert(
            "limited".to_string(),
            SmtpSettings {
                host: "127.0.0.1".into(),
                from: "Shop <no-reply@shop.example>".into(),
                tls: SmtpTls::None,
                domain_rate_limit: Some(others),
                domain_rate_limits: BTreeMap::from([("QQ.com".to_string(), named)]),
                ..Default::default()
            },
        );
        let email = Email::new(&smtp).expect("valid");
        let limits = |to: &str| {
            email.narrower_limits(&DeliveryJob {
                provider_account: "limited".into(),
                recipient: to.into(),
                ..Default::default()
            })
        };
        let domain = |id: &str, limit| NarrowerLimit {
            scope: "domain",
            id: id.into(),
            limit,
        };
        assert_eq!(limits("li@qq.com"), [domain("qq.com", named)]);
        assert_eq!(limits("Wang@Example.ORG"), [domain("example.org", others)]);
        assert!(limits("no-domain").is_empty());
    }
}
