//! The `email` channel through the whole stack against a real SMTP server: aiosmtpd running
//! `tests/smtp/sink.py`, which records every RCPT and message and refuses `nobody@…` (550) and
//! the first RCPT to `busy@…` (451). The demo template arrives as text and HTML alternatives
//! with the HTML escaped, a refused recipient fails after one RCPT, a busy one is retried and
//! sent once, a server that is down is retried and counted by the breaker, refused
//! credentials are a configuration failure, and STARTTLS and implicit TLS reach a server whose
//! certificate a configured private CA signed (and fail as configuration without it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald_contract::channels;
use herald_contract::v1::{DeliveryState, NotificationRequest, Recipient};
use herald_e2e::{TestEnv, WAIT, demo, metric_sample};
use herald_sender::breaker::BreakerSettings;
use herald_sender::channel::{AlertKind, Attempt, Channel, FailureKind};
use herald_sender::channels::email::{Email, SmtpSettings, SmtpTls};
use serde_json::{Value, json};

/// The sink: a child process, killed when the test drops it.
struct Sink {
    child: Child,
    port: u16,
    out: std::path::PathBuf,
}

/// Installs aiosmtpd from PyPI if `python3` cannot import it (once per test binary: the tests
/// run in parallel); fails clearly (never hangs) if that does not work.
fn ensure_aiosmtpd() {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(install_aiosmtpd);
}

fn install_aiosmtpd() {
    let importable = || {
        Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if importable() {
        return;
    }
    let mut pip = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--timeout",
            "20",
            "--retries",
            "1",
            "aiosmtpd",
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 runs (the e-mail tests need CPython 3 with pip)");
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = pip.try_wait().expect("pip runs") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = pip.kill();
            panic!("`python3 -m pip install aiosmtpd` took over 180 s: is PyPI reachable?");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success() && importable(),
        "the e-mail tests need aiosmtpd: `python3 -m pip install aiosmtpd` failed ({status})"
    );
}

impl Sink {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(options: &[&str]) -> Self {
        ensure_aiosmtpd();
        let out = std::env::temp_dir().join(format!("herald-smtp-{}.jsonl", uuid::Uuid::new_v4()));
        let mut child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/smtp/sink.py"))
            .arg("--out")
            .arg(&out)
            .args(options)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the SMTP sink starts");
        let stdout = child.stdout.take().expect("sink stdout");
        // The sink prints `READY <port>` once it listens.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the SMTP sink says READY within 20 s");
        let port = line
            .trim()
            .strip_prefix("READY ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the SMTP sink did not start: {line:?}"));
        Self { child, port, out }
    }

    /// The private CA's certificate the sink made for `--tls starttls|implicit`.
    fn ca_file(&self) -> String {
        format!("{}.ca.pem", self.out.display())
    }

    /// Everything recorded so far.
    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn rcpts(&self, address: &str) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["event"] == "rcpt" && e["address"] == address)
            .filter_map(|e| e["answer"].as_str().map(str::to_string))
            .collect()
    }

    fn messages_to(&self, address: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| {
                e["event"] == "message"
                    && e["rcpt_tos"]
                        .as_array()
                        .is_some_and(|to| to.iter().any(|a| a == address))
            })
            .collect()
    }

    /// Waits (up to the usual wait) for a message to `address`.
    async fn wait_for_message(&self, address: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(message) = self.messages_to(address).into_iter().next() {
                return message;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no message to {address} within {WAIT:?}: {:?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(self.ca_file());
    }
}

fn smtp(port: u16) -> SmtpSettings {
    SmtpSettings {
        host: "127.0.0.1".into(),
        port: Some(port),
        tls: SmtpTls::None,
        from: demo::EMAIL_FROM.into(),
        timeout_ms: 5_000,
        ..Default::default()
    }
}

async fn start(port: u16) -> TestEnv {
    TestEnv::start_with(|config| {
        config
            .sender
            .smtp
            .insert(demo::EMAIL_ACCOUNT.into(), smtp(port));
    })
    .await
}

fn request(order: &str, email: &str) -> NotificationRequest {
    let mut request = demo::request(demo::OPENID, order);
    request.id = uuid::Uuid::now_v7().to_string();
    request.channels = vec![channels::EMAIL.into()];
    request.recipients = vec![Recipient {
        email: email.into(),
        ..Default::default()
    }];
    request
}

async fn publish(env: &TestEnv, request: &NotificationRequest) {
    env.publish_request(&herald_contract::encode_json(request), Some("guest"), None)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_template_arrives_as_text_and_html_alternatives() {
    let sink = Sink::start();
    let mut env = start(sink.port).await;
    // A variable with markup: escaped in the HTML part, as is in the text part.
    let to = "li.lei@shop.example";
    let mut request = request("A<1>&", to);
    request.variables = serde_json::from_value(
        json!({"order_id": "A<1>&", "carrier": "SF Express", "eta": "tomorrow"}),
    )
    .ok();
    publish(&env, &request).await;
    let sent = env.wait_for_status(&request.id, DeliveryState::Sent).await;
    assert_eq!(sent.channel, channels::EMAIL);

    let message = sink.wait_for_message(to).await;
    assert_eq!(message["mail_from"], "no-reply@shop.example");
    assert_eq!(message["rcpt_tos"], json!([to]));
    assert_eq!(message["content_type"], "multipart/alternative");
    let headers = &message["headers"];
    assert_eq!(
        headers["Message-ID"],
        format!("<{}@herald>", sent.delivery_id)
    );
    assert_eq!(headers["X-Herald-Delivery-Id"], sent.delivery_id.as_str());
    assert_eq!(headers["Subject"], "Your order A<1>& is on its way");
    assert_eq!(headers["From"], demo::EMAIL_FROM);
    let part = |content_type: &str| {
        message["parts"]
            .as_array()
            .and_then(|parts| parts.iter().find(|p| p["content_type"] == content_type))
            .and_then(|p| p["body"].as_str())
            .unwrap_or_else(|| panic!("no {content_type} part: {message}"))
            .to_string()
    };
    let html = part("text/html");
    assert!(
        html.contains("<b>A&lt;1&gt;&amp;</b>") && html.contains("left with SF Express"),
        "{html}"
    );
    let text = part("text/plain");
    assert!(
        text.contains("Your order A<1>& left with SF Express. It arrives tomorrow."),
        "{text}"
    );
    assert_eq!(sink.messages_to(to).len(), 1);

    // The stored delivery names the Message-ID as the provider's message id.
    let view = env.get_message(&request.id).await;
    assert_eq!(
        view["deliveries"][0]["provider_msgid"],
        format!("<{}@herald>", sent.delivery_id),
        "{view}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_recipient_fails_after_one_rcpt_and_a_busy_one_is_retried_then_sent() {
    let sink = Sink::start();
    let mut env = start(sink.port).await;
    let (nobody, busy) = ("nobody@shop.example", "busy@shop.example");
    let refused = request("E-550", nobody);
    let retried = request("E-451", busy);
    publish(&env, &refused).await;
    publish(&env, &retried).await;

    let failed = env
        .wait_for_status(&refused.id, DeliveryState::Failed)
        .await;
    assert_eq!(failed.error_code, "550");
    assert!(
        failed.error_message.contains("No such user") && !failed.error_message.contains(nobody),
        "the reply, with the address masked: {}",
        failed.error_message
    );

    let sent = env.wait_for_status(&retried.id, DeliveryState::Sent).await;
    assert_eq!(sent.channel, channels::EMAIL);
    let view = env.get_message(&retried.id).await;
    let states = herald_e2e::timeline(&view);
    assert!(
        states.iter().any(|s| s == "retrying"),
        "the 451 made it retry: {states:?}"
    );
    assert_eq!(
        view["deliveries"][0]["timeline"]
            .as_array()
            .and_then(|t| t.iter().find(|e| e["state"] == "retrying"))
            .map(|e| e["detail"]["code"].clone()),
        Some(json!("451")),
        "{view}"
    );
    // The refused recipient was asked for once, never again; the busy one twice, and its
    // message arrived once.
    assert_eq!(sink.rcpts(nobody), ["550 5.1.1 No such user"]);
    assert_eq!(sink.rcpts(busy), ["451 4.3.0 try later", "250 OK"]);
    assert_eq!(sink.messages_to(busy).len(), 1);
    assert!(sink.messages_to(nobody).is_empty());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_is_retried_and_opens_the_breaker() {
    // A port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let mut env = TestEnv::start_with(|config| {
        config.telemetry.admin_listen = Some("127.0.0.1:0".into());
        config.sender.breaker = BreakerSettings {
            failure_threshold: 1,
            open_ms: 60_000,
            max_open_ms: 60_000,
        };
        config
            .sender
            .smtp
            .insert(demo::EMAIL_ACCOUNT.into(), smtp(closed));
    })
    .await;
    let request = request("E-DOWN", "li.lei@shop.example");
    publish(&env, &request).await;
    let retrying = env
        .wait_for_status(&request.id, DeliveryState::Retrying)
        .await;
    assert_eq!(retrying.error_code, "transport");
    env.scrape_until(|text| {
        metric_sample(
            text,
            "herald_breaker_open",
            &[("account", demo::EMAIL_ACCOUNT)],
        ) == Some(1.0)
    })
    .await;
    env.stop().await;
}

fn job(delivery_id: uuid::Uuid, account: &str) -> herald_contract::v1::DeliveryJob {
    herald_contract::decode_json(
        json!({
            "delivery_id": delivery_id.to_string(),
            "channel": channels::EMAIL,
            "provider_account": account,
            "recipient": "li.lei@shop.example",
            "payload": {"subject": "s", "text": "t"},
        })
        .to_string()
        .as_bytes(),
    )
    .expect("job decodes")
}

/// The channel alone against the real server over TLS: the sink's certificate (for
/// `localhost`) is signed by a CA of its own, which `ca_file` trusts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_implicit_tls_reach_a_server_of_a_private_ca() {
    for (mode, tls) in [
        ("starttls", SmtpTls::Starttls),
        ("implicit", SmtpTls::Implicit),
    ] {
        let sink = Sink::start_with(&["--tls", mode]);
        let settings = |ca_file: Option<String>| SmtpSettings {
            host: "localhost".into(),
            tls,
            ca_file,
            ..smtp(sink.port)
        };
        let email = Email::new(
            &[
                ("trusted".to_string(), settings(Some(sink.ca_file()))),
                ("untrusted".to_string(), settings(None)),
            ]
            .into(),
        )
        .expect("builds");
        let delivery_id = uuid::Uuid::now_v7();
        assert_eq!(
            email.send(&job(delivery_id, "trusted"), delivery_id).await,
            Attempt::Sent(format!("<{delivery_id}@herald>")),
            "{mode}"
        );
        assert_eq!(sink.messages_to("li.lei@shop.example").len(), 1, "{mode}");

        let delivery_id = uuid::Uuid::now_v7();
        match email
            .send(&job(delivery_id, "untrusted"), delivery_id)
            .await
        {
            Attempt::Failed { code, kind, .. } => {
                assert_eq!(
                    (code.as_str(), kind),
                    ("tls", FailureKind::Config),
                    "{mode}"
                );
            }
            other => panic!("{mode}: an untrusted certificate must fail as config: {other:?}"),
        }
        assert_eq!(sink.messages_to("li.lei@shop.example").len(), 1, "{mode}");
    }
}

/// The channel alone against the real server: refused credentials (535) fail the delivery as
/// configuration, with an alert, and nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_a_configuration_failure() {
    let sink = Sink::start_with(&["--refuse-auth"]);
    let account = SmtpSettings {
        username: Some("shop".into()),
        password: Some("wrong-password".into()),
        ..smtp(sink.port)
    };
    let email = Email::new(&[("shop-mail".to_string(), account)].into()).expect("builds");
    let delivery_id = uuid::Uuid::now_v7();
    match email
        .send(&job(delivery_id, "shop-mail"), delivery_id)
        .await
    {
        Attempt::Failed {
            code, kind, alert, ..
        } => {
            assert_eq!(code, "535");
            assert_eq!(kind, FailureKind::Config);
            assert_eq!(alert, Some(AlertKind::Config));
        }
        other => panic!("expected a configuration failure, got {other:?}"),
    }
    assert!(sink.events().is_empty(), "no RCPT after a refused AUTH");
}
