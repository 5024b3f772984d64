//! The fault suite (issue #9, item 4). One private RabbitMQ, Postgres and Redis (so the test
//! may kill them), every Herald service as its own OS process (so it may SIGKILL them), the
//! WeChat sandbox in this process, and a steady load of good requests over AMQP with publisher
//! confirms. Under that load, in order:
//!
//! 1. the provider answers 30% of sends 503 and holds 10% past the sender's timeout, for the
//!    whole run;
//! 2. a flood of malformed requests (bad JSON, bad protobuf, a wrong schema, missing fields,
//!    no authenticated user) is published while good traffic keeps flowing;
//! 3. the broker is `kill -9`ed and restarted (1 time in the short profile, 3 in the full one);
//! 4. each service is SIGKILLed and restarted;
//! 5. Postgres is stopped the hard way (`immediate`) and started again;
//! 6. Redis is killed and stays away for a while (8 s short, 30 s full).
//!
//! Afterwards: every request the broker confirmed is stored and its delivery is final (`sent`,
//! `delivered` or `failed`), none is lost, the sandbox delivered to no recipient twice and to
//! exactly the recipients of the sent deliveries, and the dead-letter queue holds every
//! malformed request (each with its `x-herald-dead-reason`) and nothing else.
//!
//! `HERALD_FAULT_PROFILE=full` selects the issue's numbers; the default is the short profile
//! CI runs. Method and results: docs/benchmarks.md, "Fault suite".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_amqp::{AMQPValue, AmqpSettings, BasicProperties, Broker, FieldTable};
use herald_contract::headers;
use herald_e2e::demo;
use herald_e2e::private::{PrivateInfra, ServiceProcess, free_port};
use herald_sandbox::{FaultRates, Sandbox, paths};
use heraldctl::HeraldConfig;
use tokio_util::sync::CancellationToken;

/// The header that marks a malformed request with its number, to find it in the DLQ.
const MALFORMED: &str = "x-fault-malformed";
/// The sender gives up on a provider call after this; the sandbox holds answers longer.
const REQUEST_TIMEOUT_MS: u64 = 1_000;
const HELD_MS: u64 = 2_500;

struct Profile {
    name: &'static str,
    /// Good requests per second, one recipient each.
    rate: u32,
    malformed: usize,
    broker_kills: usize,
    broker_down: Duration,
    postgres_down: Duration,
    redis_down: Duration,
    /// After the load stops, how long every delivery may take to become final.
    settle: Duration,
}

impl Profile {
    fn from_env() -> Self {
        match std::env::var("HERALD_FAULT_PROFILE").as_deref() {
            Ok("full") => Self {
                name: "full",
                rate: 20,
                malformed: 10_000,
                broker_kills: 3,
                broker_down: Duration::from_secs(3),
                postgres_down: Duration::from_secs(5),
                redis_down: Duration::from_secs(30),
                settle: Duration::from_secs(300),
            },
            _ => Self {
                name: "short",
                rate: 5,
                malformed: 300,
                broker_kills: 2,
                broker_down: Duration::from_secs(2),
                postgres_down: Duration::from_secs(3),
                redis_down: Duration::from_secs(8),
                settle: Duration::from_secs(120),
            },
        }
    }
}

/// A request the broker confirmed.
#[derive(Clone)]
struct Accepted {
    id: uuid::Uuid,
    openid: String,
}

/// What the producers did, shared with the test.
#[derive(Default)]
struct Produced {
    accepted: Mutex<Vec<Accepted>>,
    /// Publishes that failed or went unconfirmed and were published again (same id).
    republished: AtomicUsize,
    /// Malformed requests confirmed, by number; the numbers published more than once.
    malformed_confirmed: AtomicUsize,
    malformed_republished: Mutex<HashSet<u64>>,
}

/// A producer's connection that reconnects whenever a publish fails, and publishes until the
/// broker confirms (a publish that failed may still have arrived: the same message again is
/// what a producer does, and Herald's request ids make it harmless).
struct Producer {
    settings: AmqpSettings,
    broker: Option<Broker>,
}

impl Producer {
    fn new(settings: AmqpSettings) -> Self {
        Self {
            settings,
            broker: None,
        }
    }

    /// Closes the connection for good.
    async fn close(mut self) {
        if let Some(broker) = self.broker.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), broker.close()).await;
        }
    }

    /// Publishes to the requests exchange until confirmed; answers how many tries failed.
    async fn publish(&mut self, body: &[u8], properties: BasicProperties) -> usize {
        let mut failures = 0;
        loop {
            if self.broker.is_none() {
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    Broker::connect(&self.settings, "fault-producer"),
                )
                .await
                {
                    Ok(Ok(broker)) => self.broker = Some(broker),
                    _ => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                }
            }
            let Some(broker) = self.broker.as_ref() else {
                continue;
            };
            let exchange = broker.topology().requests_exchange();
            let published = tokio::time::timeout(
                Duration::from_secs(5),
                broker
                    .publisher()
                    .publish(&exchange, "request.fault", body, properties.clone()),
            )
            .await;
            match published {
                Ok(Ok(())) => return failures,
                _ => {
                    failures += 1;
                    if let Some(broker) = self.broker.take() {
                        let _ = tokio::time::timeout(Duration::from_secs(1), broker.close()).await;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

fn request_properties(user: Option<&str>, schema: &str) -> BasicProperties {
    let mut table = FieldTable::default();
    table.insert(
        headers::SCHEMA_VERSION.into(),
        AMQPValue::LongString(schema.into()),
    );
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(table);
    if let Some(user) = user {
        properties = properties.with_user_id(user.into());
    }
    properties
}

/// Good requests at `rate` per second until `stop`: the demo template to a recipient of its
/// own, with an idempotency key of its own.
async fn good_load(
    settings: AmqpSettings,
    rate: u32,
    produced: Arc<Produced>,
    stop: CancellationToken,
) {
    let mut producer = Producer::new(settings);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0.. {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let id = uuid::Uuid::now_v7();
        let openid = format!("oFault{n:022}");
        let mut request = demo::request(&openid, &format!("F-{n}"));
        request.id = id.to_string();
        request.idempotency_key = format!("fault-{id}");
        let body = herald_contract::encode_json(&request);
        let failures = producer
            .publish(
                &body,
                request_properties(Some("guest"), herald_contract::SCHEMA_VERSION),
            )
            .await;
        produced.republished.fetch_add(failures, Ordering::SeqCst);
        produced
            .accepted
            .lock()
            .expect("produced lock")
            .push(Accepted { id, openid });
    }
    producer.close().await;
}

/// Malformed request number `n`: five kinds in turn. Each carries [`MALFORMED`] = n.
fn malformed(n: u64) -> (Vec<u8>, BasicProperties) {
    let (body, properties) = match n % 5 {
        // JSON cut short.
        0 => (
            format!(
                r#"{{"template": {{"id": "order_shipped"}}, "recipients": [{{"wechatOpenid": "o{n}"#
            )
            .into_bytes(),
            request_properties(Some("guest"), herald_contract::SCHEMA_VERSION),
        ),
        // A protobuf body (Herald's AMQP contract is proto3 JSON).
        1 => {
            let mut body = vec![0x0a, 0x24];
            body.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            body.extend_from_slice(&[0x12, 0x0f, 0xff, 0xfe, 0x00, 0x81]);
            body.extend_from_slice(&n.to_le_bytes());
            (
                body,
                request_properties(Some("guest"), herald_contract::SCHEMA_VERSION)
                    .with_content_type("application/x-protobuf".into()),
            )
        }
        // Another schema's shape under another schema header.
        2 => (
            format!(r#"{{"template": "order_shipped", "recipients": {n}, "to": ["o{n}"]}}"#)
                .into_bytes(),
            request_properties(Some("guest"), "herald.v2"),
        ),
        // Well-formed, but no template and no recipient.
        3 => (
            format!(
                r#"{{"id": "{}", "channels": ["wechat.template"]}}"#,
                uuid::Uuid::now_v7()
            )
            .into_bytes(),
            request_properties(Some("guest"), herald_contract::SCHEMA_VERSION),
        ),
        // A good request, but published by no authenticated user.
        _ => {
            let mut request = demo::request(&format!("oMalformed{n:018}"), "M");
            request.id = uuid::Uuid::now_v7().to_string();
            (
                herald_contract::encode_json(&request),
                request_properties(None, herald_contract::SCHEMA_VERSION),
            )
        }
    };
    let mut table = properties.headers().clone().unwrap_or_default();
    table.insert(MALFORMED.into(), AMQPValue::LongLongInt(n as i64));
    (body, properties.with_headers(table))
}

/// Publishes malformed requests `0..count` from `FLOOD_PRODUCERS` connections at once (each
/// waits for its confirms, so more producers make a faster flood).
async fn malformed_flood(settings: AmqpSettings, count: usize, produced: Arc<Produced>) {
    const FLOOD_PRODUCERS: u64 = 8;
    let mut producers = tokio::task::JoinSet::new();
    for first in 0..FLOOD_PRODUCERS {
        let (settings, produced) = (settings.clone(), produced.clone());
        producers.spawn(async move {
            let mut producer = Producer::new(settings);
            for n in (first..count as u64).step_by(FLOOD_PRODUCERS as usize) {
                let (body, properties) = malformed(n);
                if producer.publish(&body, properties).await > 0 {
                    produced
                        .malformed_republished
                        .lock()
                        .expect("produced lock")
                        .insert(n);
                }
                produced.malformed_confirmed.fetch_add(1, Ordering::SeqCst);
            }
            producer.close().await;
        });
    }
    while let Some(done) = producers.join_next().await {
        done.expect("flood producer");
    }
}

/// The test's view of the database: reconnects whenever Postgres went away.
struct Db {
    url: String,
    client: Option<tokio_postgres::Client>,
}

impl Db {
    async fn client(&mut self) -> Option<&tokio_postgres::Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            let connected = tokio::time::timeout(
                Duration::from_secs(3),
                tokio_postgres::connect(&self.url, tokio_postgres::NoTls),
            )
            .await;
            if let Ok(Ok((client, connection))) = connected {
                tokio::spawn(connection);
                self.client = Some(client);
            }
        }
        self.client.as_ref()
    }

    /// Deliveries per state (all of them), or None while the database is away.
    async fn states(&mut self) -> Option<BTreeMap<String, i64>> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT state, count(*) FROM deliveries GROUP BY state", &[])
            .await
            .ok()?;
        Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn delivered(&mut self) -> Option<i64> {
        let states = self.states().await?;
        Some(states.get("delivered").copied().unwrap_or(0))
    }
}

/// The running services, restarted like an orchestrator would if one ends on its own.
type Services = Arc<Mutex<Vec<ServiceProcess>>>;

fn service<R>(services: &Services, name: &str, f: impl FnOnce(&mut ServiceProcess) -> R) -> R {
    let mut all = services.lock().expect("services lock");
    let process = all
        .iter_mut()
        .find(|p| p.name == name)
        .expect("a service of that name");
    f(process)
}

struct Run {
    db: Db,
    services: Services,
    sandbox: Sandbox,
    started: Instant,
    timeline: Vec<(String, Duration)>,
}

impl Run {
    /// Waits until `more` deliveries more than now are `delivered` (the whole path works:
    /// render, send, callback, projection).
    async fn progress(&mut self, what: &str, more: i64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut start = None;
        loop {
            if let Some(now) = self.db.delivered().await {
                let base = *start.get_or_insert(now);
                if now >= base + more {
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .services
                    .lock()
                    .expect("services lock")
                    .iter()
                    .map(|p| format!("--- {} ---\n{}", p.name, p.log_tail(15)))
                    .collect();
                panic!(
                    "no progress after `{what}` within {timeout:?} (states {:?}, {} provider sends)\n{}",
                    self.db.states().await,
                    self.sandbox.accepted_sends().len(),
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.mark(what);
    }

    fn mark(&mut self, what: &str) {
        let at = self.started.elapsed();
        eprintln!("[fault {:>6.1}s] {what}", at.as_secs_f64());
        self.timeline.push((what.to_string(), at));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_notification_ends_final_once_through_faults() {
    let profile = Profile::from_env();
    let started = Instant::now();
    herald_e2e::init_telemetry(None);
    let mut infra = PrivateInfra::start().await;
    eprintln!(
        "[fault {:>6.1}s] private RabbitMQ :{}, Postgres :{}, Redis :{} under {} ({} profile)",
        started.elapsed().as_secs_f64(),
        infra.rabbit.port,
        infra.postgres.port,
        infra.redis.port,
        infra.dir.path.display(),
        profile.name
    );

    // The deployment: every service on fixed ports of its own, pointed at the private
    // infrastructure and at the sandbox in this process.
    let sandbox_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("sandbox listens");
    let sandbox_url = format!(
        "http://{}",
        sandbox_listener.local_addr().expect("sandbox address")
    );
    let mut config = HeraldConfig::default().with_demo_account();
    config.amqp.url = infra.rabbit.url();
    config.amqp.retry_tiers = vec!["200ms".into(), "1s".into()];
    config.postgres.url = infra.postgres.url("herald");
    config.postgres.pool_size = 4;
    let redis = infra.redis.url();
    config.token.redis.url = redis.clone();
    config.sender.redis.url = redis.clone();
    config.renderer.redis.url = redis;
    config.telemetry.log_filter = "warn".into();
    let (token_port, ingress_port, callback_port) = (free_port(), free_port(), free_port());
    config.token.listen = format!("127.0.0.1:{token_port}");
    config.ingress.listen = format!("127.0.0.1:{ingress_port}");
    config.callback.listen = format!("127.0.0.1:{callback_port}");
    for account in config.token.accounts.values_mut() {
        account.base_url = sandbox_url.clone();
    }
    config.token_service.url = format!("http://127.0.0.1:{token_port}");
    config.token_service.auth_token = config.token.auth_token.clone();
    config.sender.channels = vec![herald_contract::channels::WECHAT_TEMPLATE.into()];
    config.sender.wechat_base_url = sandbox_url.clone();
    config.sender.wecom_base_url = sandbox_url.clone();
    config.sender.request_timeout_ms = REQUEST_TIMEOUT_MS;
    // A provider failing 40% of calls must not exhaust deliveries (0.4^25 is nil), and the
    // breaker it keeps opening closes again within the run.
    config.sender.max_attempts = 25;
    config.sender.breaker.open_ms = 500;
    config.sender.breaker.max_open_ms = 2_000;
    config.sender.drain_timeout_ms = 1_000;
    config.sandbox.callback_delay_ms = 50;
    config.sandbox.callback_retry_interval_ms = 1_000;
    for app in &mut config.sandbox.apps {
        if app.appid == demo::APPID {
            app.callback_url = Some(format!(
                "http://127.0.0.1:{callback_port}/v1/callbacks/wechat/{}",
                demo::ACCOUNT
            ));
        }
    }
    heraldctl::stack::prepare(&config)
        .await
        .expect("database, topology and demo tenant");
    let config_path = infra.dir.path.join("herald.json");
    std::fs::write(
        &config_path,
        serde_json::to_vec_pretty(&config).expect("configuration serialises"),
    )
    .expect("write the configuration");

    let sandbox = Sandbox::new(config.sandbox.clone());
    let sandbox_stop = CancellationToken::new();
    tokio::spawn(
        sandbox
            .clone()
            .serve(sandbox_listener, sandbox_stop.clone().cancelled_owned()),
    );
    sandbox.set_fault_rates(
        paths::TEMPLATE_SEND,
        Some(FaultRates {
            status_ratio: 0.3,
            status: 503,
            delay_ratio: 0.1,
            delay_ms: HELD_MS,
        }),
    );

    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_herald-fault-service"));
    let services: Services = Arc::new(Mutex::new(
        ["token", "ingress", "renderer", "sender", "callback"]
            .into_iter()
            .map(|name| ServiceProcess::start(&exe, name, &config_path, &infra.dir.path))
            .collect(),
    ));
    let supervisor_stop = CancellationToken::new();
    let supervisor = tokio::spawn({
        let (services, stop) = (services.clone(), supervisor_stop.clone());
        async move {
            while !stop.is_cancelled() {
                for process in services.lock().expect("services lock").iter_mut() {
                    if process.restart_if_exited() {
                        eprintln!("[fault] {} ended on its own; started again", process.name);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });

    let produced = Arc::new(Produced::default());
    let load_stop = CancellationToken::new();
    let load = tokio::spawn(good_load(
        config.amqp.clone(),
        profile.rate,
        produced.clone(),
        load_stop.clone(),
    ));
    let mut run = Run {
        db: Db {
            url: config.postgres.url.clone(),
            client: None,
        },
        services: services.clone(),
        sandbox: sandbox.clone(),
        started,
        timeline: Vec::new(),
    };
    run.progress("services up, load flowing", 10, Duration::from_secs(60))
        .await;

    // The malformed flood, with good traffic flowing alongside.
    let flood_started = Instant::now();
    malformed_flood(config.amqp.clone(), profile.malformed, produced.clone()).await;
    let flood_publish = flood_started.elapsed();
    let observer = Broker::connect(&config.amqp, "fault-observer")
        .await
        .expect("observer connection");
    let dead_queue = observer.topology().dead_queue();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while dead_depth(&config.amqp, &dead_queue).await < profile.malformed as u32 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the malformed flood was not parked within 300 s ({} parked)",
            dead_depth(&config.amqp, &dead_queue).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    observer.close().await;
    run.mark(&format!(
        "{} malformed published in {:.1} s and parked",
        profile.malformed,
        flood_publish.as_secs_f64()
    ));
    run.progress(
        "good traffic flows after the flood",
        10,
        Duration::from_secs(60),
    )
    .await;

    for n in 1..=profile.broker_kills {
        infra.rabbit.kill();
        run.mark(&format!("broker killed ({n})"));
        tokio::time::sleep(profile.broker_down).await;
        infra.rabbit.restart(Duration::from_secs(90)).await;
        run.mark(&format!("broker up again ({n})"));
        run.progress(
            &format!("progress after broker restart {n}"),
            10,
            Duration::from_secs(90),
        )
        .await;
    }

    for name in ["renderer", "sender", "callback", "token", "ingress"] {
        service(&services, name, ServiceProcess::restart);
        run.mark(&format!("{name} SIGKILLed and started again"));
        if name == "ingress" {
            wait_http_ok(&format!("http://127.0.0.1:{ingress_port}/healthz")).await;
        }
        run.progress(
            &format!("progress after the {name} restart"),
            10,
            Duration::from_secs(60),
        )
        .await;
    }

    let postgres = &infra.postgres;
    tokio::task::block_in_place(|| postgres.kill());
    run.mark("postgres stopped (immediate)");
    tokio::time::sleep(profile.postgres_down).await;
    tokio::task::block_in_place(|| postgres.restart());
    run.mark("postgres up again");
    run.progress(
        "progress after the postgres restart",
        10,
        Duration::from_secs(90),
    )
    .await;

    infra.redis.kill();
    run.mark("redis stopped");
    tokio::time::sleep(profile.redis_down).await;
    infra.redis.restart(Duration::from_secs(20)).await;
    run.mark("redis up again");
    run.progress(
        "progress after the redis restart",
        10,
        Duration::from_secs(60),
    )
    .await;

    // The load stops; every accepted request must settle.
    load_stop.cancel();
    load.await.expect("load generator");
    let accepted = produced.accepted.lock().expect("produced lock").clone();
    run.mark(&format!(
        "load stopped: {} requests accepted",
        accepted.len()
    ));
    let ids: Vec<uuid::Uuid> = accepted.iter().map(|a| a.id).collect();
    let deadline = tokio::time::Instant::now() + profile.settle;
    let final_states = ["sent", "delivered", "failed"];
    let (messages, states) = loop {
        if let Some(client) = run.db.client().await {
            let found = client
                .query_one("SELECT count(*) FROM messages WHERE id = ANY($1)", &[&ids])
                .await;
            let states = client
                .query(
                    "SELECT state, count(*) FROM deliveries WHERE message_id = ANY($1) GROUP BY state",
                    &[&ids],
                )
                .await;
            if let (Ok(found), Ok(states)) = (found, states) {
                let found: i64 = found.get(0);
                let states: BTreeMap<String, i64> =
                    states.iter().map(|r| (r.get(0), r.get(1))).collect();
                let settled: i64 = states
                    .iter()
                    .filter(|(s, _)| final_states.contains(&s.as_str()))
                    .map(|(_, n)| n)
                    .sum();
                if found == ids.len() as i64 && settled == ids.len() as i64 {
                    break (found, states);
                }
                if tokio::time::Instant::now() >= deadline {
                    break (found, states);
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the database never answered after the load"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    run.mark(&format!(
        "settled: {messages} messages, deliveries {states:?}"
    ));
    // Every check below adds what it found wrong; all of it is reported at once.
    let mut problems: Vec<String> = Vec::new();
    if messages != ids.len() as i64 {
        problems.push(format!(
            "{} of {} accepted requests are not stored (lost)",
            ids.len() as i64 - messages,
            ids.len()
        ));
    }
    let delivery_total: i64 = states.values().sum();
    if delivery_total != ids.len() as i64 {
        problems.push(format!(
            "{delivery_total} deliveries for {} accepted requests of one recipient each",
            ids.len()
        ));
    }
    let unsettled: Vec<_> = states
        .iter()
        .filter(|(s, _)| !final_states.contains(&s.as_str()))
        .collect();
    if !unsettled.is_empty() {
        problems.push(format!(
            "deliveries not final {:?} after the load",
            unsettled
        ));
    }

    // The provider's side: one delivery per recipient, exactly to the sent deliveries.
    let client = run.db.client().await.expect("database");
    let rows = client
        .query(
            "SELECT recipient, state FROM deliveries WHERE message_id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("deliveries");
    let by_state: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let ours: HashSet<&str> = accepted.iter().map(|a| a.openid.as_str()).collect();
    let mut per_recipient: HashMap<String, usize> = HashMap::new();
    for send in sandbox.accepted_sends() {
        *per_recipient.entry(send.openid).or_default() += 1;
    }
    let twice: Vec<_> = per_recipient.iter().filter(|(_, n)| **n > 1).collect();
    if !twice.is_empty() {
        problems.push(format!("recipients who got a message twice: {twice:?}"));
    }
    let strangers: Vec<_> = per_recipient
        .keys()
        .filter(|openid| !ours.contains(openid.as_str()))
        .collect();
    if !strangers.is_empty() {
        problems.push(format!(
            "the provider delivered to recipients of no accepted request: {strangers:?}"
        ));
    }
    let sent: HashSet<&str> = by_state
        .iter()
        .filter(|(_, s)| matches!(s.as_str(), "sent" | "delivered"))
        .map(|(r, _)| r.as_str())
        .collect();
    let not_delivered: Vec<_> = sent
        .iter()
        .filter(|r| !per_recipient.contains_key(**r))
        .collect();
    if !not_delivered.is_empty() {
        problems.push(format!(
            "sent deliveries the provider never accepted: {not_delivered:?}"
        ));
    }
    let failed_but_delivered = per_recipient
        .keys()
        .filter(|r| by_state.get(*r).is_some_and(|s| s == "failed"))
        .count();
    if per_recipient.len() != sent.len() + failed_but_delivered {
        problems.push(format!(
            "{} distinct recipients reached, but {} deliveries sent (+ {failed_but_delivered} \
             failed whose held answer came too late)",
            per_recipient.len(),
            sent.len()
        ));
    }

    // The dead-letter queue: the malformed requests, each with its reason, and nothing else
    // but jobs of deliveries that failed by exhaustion.
    let failed: HashSet<String> = rows
        .iter()
        .filter(|r| r.get::<_, String>(1) == "failed")
        .map(|r| r.get::<_, String>(0))
        .collect();
    let dead = drain_dead_letters(&config.amqp).await;
    let mut reasons: BTreeMap<(u64, String), usize> = BTreeMap::new();
    let mut parked: HashMap<u64, usize> = HashMap::new();
    let mut unexpected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (table, body) in &dead {
        let reason = herald_amqp::header_str(Some(table), headers::DEAD_REASON).map(str::to_string);
        let marker = herald_amqp::header_i64(Some(table), MALFORMED);
        match (marker, reason) {
            (Some(n), Some(reason)) => {
                let n = n as u64;
                *parked.entry(n).or_default() += 1;
                *reasons.entry((n % 5, reason)).or_default() += 1;
            }
            (_, reason) => {
                let exhausted_failed = reason.as_deref() == Some("exhausted")
                    && failed
                        .iter()
                        .any(|r| String::from_utf8_lossy(body).contains(r.as_str()));
                if !exhausted_failed {
                    // The broker's own parking (x-delivery-limit) sets no Herald reason.
                    let why = reason
                        .or_else(|| {
                            herald_amqp::header_str(Some(table), "x-first-death-reason")
                                .map(|r| format!("broker: {r}"))
                        })
                        .unwrap_or_else(|| "none".into());
                    let queue = herald_amqp::header_str(Some(table), headers::DEAD_QUEUE)
                        .or_else(|| herald_amqp::header_str(Some(table), "x-first-death-queue"))
                        .unwrap_or_default();
                    unexpected
                        .entry(format!("{why} from {queue}"))
                        .or_default()
                        .push(String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned());
                }
            }
        }
    }
    let republished = produced
        .malformed_republished
        .lock()
        .expect("produced lock")
        .clone();
    let missing: Vec<u64> = (0..profile.malformed as u64)
        .filter(|n| !parked.contains_key(n))
        .collect();
    let doubled: Vec<_> = parked
        .iter()
        .filter(|(n, count)| **count > 1 && !republished.contains(n))
        .collect();
    run.mark(&format!(
        "dead letters: {} in all; malformed by kind and reason {reasons:?}",
        dead.len()
    ));
    for (why, bodies) in &unexpected {
        problems.push(format!(
            "{} dead letters that do not belong there ({why}), e.g. {:?}",
            bodies.len(),
            &bodies[..bodies.len().min(3)]
        ));
    }
    if !missing.is_empty() {
        problems.push(format!(
            "{} malformed requests were not parked, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    if !doubled.is_empty() {
        problems.push(format!(
            "malformed requests parked more than once though published once: {doubled:?}"
        ));
    }

    // What the provider did: calls answered normally, with a 503, or held past the timeout.
    let calls: BTreeMap<&str, u64> = sandbox.drawn_faults().into_iter().collect();
    let unplanned: Vec<(&str, usize)> = services
        .lock()
        .expect("services lock")
        .iter()
        .map(|p| (p.name, p.unplanned_exits))
        .collect();
    eprintln!(
        "[fault] {} profile: {} accepted ({} publishes repeated), deliveries {states:?}, \
         {} recipients reached, provider calls {calls:?}, {} dead letters, \
         unplanned exits {unplanned:?}, {:.1} s in all",
        profile.name,
        accepted.len(),
        produced.republished.load(Ordering::SeqCst),
        per_recipient.len(),
        dead.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        problems.is_empty(),
        "the fault suite found:\n- {}",
        problems.join("\n- ")
    );

    supervisor_stop.cancel();
    let _ = supervisor.await;
    services.lock().expect("services lock").clear();
    sandbox_stop.cancel();
    drop(infra);
}

/// Messages ready in the dead-letter queue (a passive declare on a connection of its own:
/// exact, and 0 while the broker is away).
async fn dead_depth(settings: &AmqpSettings, queue: &str) -> u32 {
    let depth = async {
        let broker = Broker::connect(settings, "fault-depth").await.ok()?;
        let depth = broker.queue_depth(queue).await.ok();
        broker.close().await;
        depth
    };
    tokio::time::timeout(Duration::from_secs(5), depth)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Takes every message out of the dead-letter queue: (headers, body) of each.
async fn drain_dead_letters(settings: &AmqpSettings) -> Vec<(FieldTable, Vec<u8>)> {
    let broker = Broker::connect(settings, "fault-dlq")
        .await
        .expect("dlq connection");
    let queue = broker.topology().dead_queue();
    let expected = dead_depth(settings, &queue).await as usize;
    let mut consumer = broker
        .consume_with_prefetch(&queue, "fault-dlq", 500)
        .await
        .expect("consume the dead letters");
    let mut dead = Vec::with_capacity(expected);
    // The depth was exact when read; anything parked since shows up within the quiet period.
    loop {
        let quiet = if dead.len() < expected {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(2)
        };
        match tokio::time::timeout(quiet, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                let _ = delivery.acker.ack(Default::default()).await;
                dead.push((
                    delivery.properties.headers().clone().unwrap_or_default(),
                    delivery.data,
                ));
            }
            _ => break,
        }
    }
    broker.close().await;
    dead
}

async fn wait_http_ok(url: &str) {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.get(url).send().await
            && response.status().is_success()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} did not answer within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
