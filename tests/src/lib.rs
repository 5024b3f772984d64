//! Test harness: a private Herald stack per test, isolated by a fresh database, a unique AMQP
//! name prefix and a unique Redis key prefix, so test runs never see each other's messages.

use std::time::Duration;

use herald_amqp::{AMQPValue, BasicProperties, Broker, Consumer, Delivery, FieldTable};
use herald_contract::v1::{DeliveryState, StatusEvent};
use herald_contract::{decode_json, headers};
use heraldctl::{HeraldConfig, Stack};

pub use heraldctl::demo;

pub mod private;

/// How long any single awaited event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Tracing stays installed for the whole test binary.
static TELEMETRY: std::sync::OnceLock<herald_telemetry::TelemetryGuard> =
    std::sync::OnceLock::new();

/// Installs tracing for this test binary (once; the first call decides where spans go).
pub fn init_telemetry(otlp_endpoint: Option<String>) {
    TELEMETRY.get_or_init(|| {
        herald_telemetry::init(
            "herald-tests",
            &herald_telemetry::TelemetrySettings {
                log_filter: "warn".into(),
                otlp_endpoint,
                ..Default::default()
            },
        )
    });
}

/// Exports every finished span now.
pub fn flush_telemetry() {
    if let Some(guard) = TELEMETRY.get() {
        guard.flush();
    }
}

pub struct TestEnv {
    pub id: String,
    pub stack: Stack,
    /// The test's own connection, for publishing like a producer and reading queues.
    pub broker: Broker,
    pub http: reqwest::Client,
    statuses: Consumer,
}

impl TestEnv {
    /// Starts a private stack (every service plus the sandbox) on free ports.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// `start`, with the test's own changes to the configuration.
    pub async fn start_with(customize: impl FnOnce(&mut HeraldConfig)) -> Self {
        init_telemetry(None);
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let mut config = HeraldConfig::default();
        config.postgres.url = format!("postgres://postgres@127.0.0.1:5432/herald_test_{id}");
        config.postgres.pool_size = 4;
        config.amqp.prefix = format!("herald-test-{id}");
        // Leftovers of a crashed run vanish on their own.
        config.amqp.queue_expires_ms = Some(600_000);
        config.amqp.retry_tiers = vec!["200ms".into(), "1s".into()];
        config.token.redis.key_prefix = format!("herald-test-{id}:");
        config.sender.redis.key_prefix = format!("herald-test-{id}:");
        config.renderer.redis.key_prefix = format!("herald-test-{id}:");
        config.token.listen = "127.0.0.1:0".into();
        config.ingress.listen = "127.0.0.1:0".into();
        config.callback.listen = "127.0.0.1:0".into();
        config.sandbox.listen = "127.0.0.1:0".into();
        config.sandbox.callback_delay_ms = 50;
        customize(&mut config);
        let stack = Stack::start(config.with_demo_account())
            .await
            .expect("stack starts");
        let broker = Broker::connect(&stack.config.amqp, "tests")
            .await
            .expect("test connection");
        let statuses = broker
            .subscribe_temporary(&broker.topology().status_exchange(), "status.#")
            .await
            .expect("status subscription");
        Self {
            id,
            stack,
            broker,
            http: reqwest::Client::new(),
            statuses,
        }
    }

    /// Publishes `body` to the requests exchange as a producer would.
    pub async fn publish_request(
        &self,
        body: &[u8],
        user_id: Option<&str>,
        traceparent: Option<&str>,
    ) {
        let mut table = FieldTable::default();
        if let Some(tp) = traceparent {
            table.insert(
                headers::TRACEPARENT.into(),
                AMQPValue::LongString(tp.into()),
            );
        }
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(table);
        if let Some(user) = user_id {
            properties = properties.with_user_id(user.into());
        }
        self.broker
            .publisher()
            .publish(
                &self.broker.topology().requests_exchange(),
                "request.test",
                body,
                properties,
            )
            .await
            .expect("publish confirmed");
    }

    /// Waits for the status event that puts `message_id`'s delivery into `state`.
    pub async fn wait_for_status(&mut self, message_id: &str, state: DeliveryState) -> StatusEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let delivery = tokio::time::timeout_at(deadline, self.statuses.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no `{}` status for {message_id} within {WAIT:?}",
                        state.name()
                    )
                })
                .expect("status subscription open")
                .expect("status delivery");
            let event: StatusEvent = decode_json(&delivery.data).expect("status event decodes");
            if event.message_id == message_id && event.state() == state {
                return event;
            }
        }
    }

    /// The next message parked in the dead-letter queue.
    pub async fn next_dead_letter(&self) -> Delivery {
        let mut consumer = self
            .broker
            .consume(&self.broker.topology().dead_queue(), "")
            .await
            .expect("consume dead letters");
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a dead letter within the wait")
            .expect("consumer open")
            .expect("delivery");
        delivery
            .acker
            .ack(Default::default())
            .await
            .expect("ack dead letter");
        delivery
    }

    /// Publishes the demo request for `openid` over AMQP and returns its message id.
    pub async fn send_demo(&self, openid: &str, order: &str) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        let mut request = demo::request(openid, order);
        request.id = id.clone();
        self.publish_request(&herald_contract::encode_json(&request), Some("guest"), None)
            .await;
        id
    }

    /// The template sends the sandbox received for `openid`, oldest first.
    pub fn sends_to(&self, openid: &str) -> Vec<herald_sandbox::LoggedRequest> {
        self.stack
            .sandbox
            .requests()
            .into_iter()
            .filter(|r| {
                r.path == herald_sandbox::paths::TEMPLATE_SEND && r.body["touser"] == openid
            })
            .collect()
    }

    /// `POST /v1/messages` with the demo API key.
    pub async fn post_message(&self, body: &str, extra: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/v1/messages", self.stack.ingress_url))
            .bearer_auth(demo::API_KEY)
            .header("content-type", "application/json")
            .body(body.to_string());
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        request.send().await.expect("ingress answers")
    }

    /// `GET /v1/messages/{id}` with the demo API key, as JSON.
    pub async fn get_message(&self, id: &str) -> serde_json::Value {
        let response = self
            .http
            .get(format!("{}/v1/messages/{id}", self.stack.ingress_url))
            // The auth scheme is case-insensitive; the look-ups exercise that.
            .header("authorization", format!("bearer {}", demo::API_KEY))
            .send()
            .await
            .expect("ingress answers");
        assert_eq!(response.status(), 200, "GET /v1/messages/{id}");
        response.json().await.expect("JSON view")
    }

    /// A direct connection to this test's database, for assertions.
    pub async fn db(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.stack.config.postgres.url, tokio_postgres::NoTls)
                .await
                .expect("test database");
        tokio::spawn(connection);
        client
    }

    /// Stops the stack and removes this test's queues, exchanges, database and Redis keys.
    pub async fn stop(self) {
        let config = self.stack.config.clone();
        self.stack.stop().await;
        self.broker
            .delete_topology()
            .await
            .expect("delete topology");
        self.broker.close().await;
        herald_store::drop_database(&config.postgres.url)
            .await
            .expect("drop test database");
        if let Ok(client) = redis::Client::open(config.token.redis.url.as_str())
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let pattern = format!("{}*", config.token.redis.key_prefix);
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
            }
        }
    }
}

/// A RabbitMQ user of its own for one test (a producer that is not Herald), removed on drop.
pub struct RabbitUser {
    pub name: String,
    pub password: String,
}

impl RabbitUser {
    pub fn create() -> Self {
        let name = format!(
            "herald-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", &name, &password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        Self { name, password }
    }

    /// The AMQP URL to connect as this user.
    pub fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The states of the first delivery's timeline in a `GET /v1/messages/{id}` view.
pub fn timeline(view: &serde_json::Value) -> Vec<String> {
    view["deliveries"][0]["timeline"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|e| e["state"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A W3C traceparent with a fresh random trace id, as a producer's tracer would send.
pub fn new_traceparent() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    (format!("00-{trace_id}-{span_id}-01"), trace_id)
}

impl TestEnv {
    /// Waits until each of `message_ids` has had a status event putting its delivery into
    /// `state`, within `timeout` in all; answers those events in arrival order. Events of other
    /// messages or states are skipped, as [`TestEnv::wait_for_status`] does.
    pub async fn wait_for_statuses(
        &mut self,
        message_ids: &[String],
        state: DeliveryState,
        timeout: Duration,
    ) -> Vec<StatusEvent> {
        let mut waiting: std::collections::HashSet<&str> =
            message_ids.iter().map(String::as_str).collect();
        let mut events = Vec::with_capacity(waiting.len());
        let deadline = tokio::time::Instant::now() + timeout;
        while !waiting.is_empty() {
            let delivery = tokio::time::timeout_at(deadline, self.statuses.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{} of {} messages had no `{}` status within {timeout:?}",
                        waiting.len(),
                        message_ids.len(),
                        state.name()
                    )
                })
                .expect("status subscription open")
                .expect("status delivery");
            let event: StatusEvent = decode_json(&delivery.data).expect("status event decodes");
            if event.state() == state && waiting.remove(event.message_id.as_str()) {
                events.push(event);
            }
        }
        events
    }
}

impl TestEnv {
    /// Waits until `n` distinct deliveries have had a status event putting them into `state`
    /// (of any message), within `timeout`; answers those events in arrival order.
    pub async fn wait_for_deliveries(
        &mut self,
        state: DeliveryState,
        n: usize,
        timeout: Duration,
    ) -> Vec<StatusEvent> {
        let mut seen = std::collections::HashSet::new();
        let mut events = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        while seen.len() < n {
            let delivery = tokio::time::timeout_at(deadline, self.statuses.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {n} deliveries reached `{}` within {timeout:?}",
                        seen.len(),
                        state.name()
                    )
                })
                .expect("status subscription open")
                .expect("status delivery");
            let event: StatusEvent = decode_json(&delivery.data).expect("status event decodes");
            if event.state() == state && seen.insert(event.delivery_id.clone()) {
                events.push(event);
            }
        }
        events
    }

    /// Publishes one demo request to every openid in `openids`, with `priority`; returns its
    /// message id.
    pub async fn send_demo_to(
        &self,
        openids: &[String],
        priority: herald_contract::v1::Priority,
        order: &str,
    ) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        let mut request = demo::request(demo::OPENID, order);
        request.id = id.clone();
        request.recipients = openids
            .iter()
            .map(|openid| herald_contract::v1::Recipient {
                wechat_openid: openid.clone(),
                ..Default::default()
            })
            .collect();
        request.priority = priority as i32;
        self.publish_request(&herald_contract::encode_json(&request), Some("guest"), None)
            .await;
        id
    }

    /// Messages ready in `queue` right now (a passive declare: exact, unlike rabbitmqctl).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        self.broker.queue_depth(queue).await.expect("queue exists")
    }
}

/// The value of the first sample of `name` in Prometheus text whose labels contain every
/// `(key, value)` given.
pub fn metric_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

impl TestEnv {
    /// Scrapes the stack's `/metrics` (the env must run with `telemetry.admin_listen`) until
    /// `check` holds for the text, within the usual wait; returns that text.
    pub async fn scrape_until(&self, check: impl Fn(&str) -> bool) -> String {
        let admin = self.stack.admin_url.clone().expect("admin listener");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self
                .http
                .get(format!("{admin}/metrics"))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
            if check(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metrics never matched:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A distinct, valid-looking openid (28 characters) for recipient `n`.
pub fn openid(n: usize) -> String {
    format!("oTest{n:023}")
}

/// A TCP proxy the test controls, between a service and a real server: `cut` drops every
/// connection through it at once (the server sees the client vanish, the client sees its
/// connection reset), while new connections are still accepted.
pub struct TcpProxy {
    pub port: u16,
    connections: std::sync::Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listens");
        let port = listener.local_addr().expect("proxy address").port();
        let connections = std::sync::Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let target = target.to_string();
        let accept_task = tokio::spawn({
            let connections = connections.clone();
            let accepted = accepted.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let target = target.clone();
                    let mut set = connections.lock().expect("proxy lock");
                    set.spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    while set.try_join_next().is_some() {}
                }
            }
        });
        Self {
            port,
            connections,
            accepted,
            accept_task,
        }
    }

    /// Connections accepted so far (a reconnect shows up here).
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Drops every open connection through the proxy.
    pub fn cut(&self) {
        self.connections.lock().expect("proxy lock").abort_all();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cut();
    }
}
