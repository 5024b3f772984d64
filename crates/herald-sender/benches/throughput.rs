//! Throughput of one sender worker against the WeChat sandbox: sends per second and CPU time
//! per send of the worker process.
//!
//! `cargo bench -p herald-sender --bench throughput [-- JOBS]` (default 5,000 jobs). Needs the
//! local RabbitMQ, Postgres and Redis. The bench prepares a private database, topology and
//! Redis prefix, starts the sandbox (no callbacks) and the token service in this process,
//! queues JOBS delivery jobs (one message each), then starts the `herald-sender` binary as a
//! child process with default settings and measures from its first send to its last: wall
//! time from the sandbox's receive log, CPU time from `/proc/<pid>/stat` of the worker alone.
//! Everything is removed afterwards.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use herald_amqp::{AMQPValue, AmqpSettings, BasicProperties, Broker, FieldTable};
use herald_contract::v1::DeliveryJob;
use herald_contract::{channels, encode_json, headers};
use herald_sandbox::{Sandbox, SandboxConfig};
use herald_store::{NewDelivery, NewMessage, Store, StoreSettings};
use herald_token::{AccountConfig, TokenService, TokenServiceConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const ACCOUNT: &str = "bench-oa";
const TENANT: &str = "bench";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5_000);
    let id = Uuid::new_v4().simple().to_string()[..12].to_string();
    let prefix = format!("herald-bench-{id}");
    let db_url = format!("postgres://postgres@127.0.0.1:5432/herald_bench_{id}");
    let redis_prefix = format!("{prefix}:");
    let shutdown = CancellationToken::new();

    // Sandbox without callbacks, and the token service in front of it.
    let mut sandbox_config = SandboxConfig::default();
    for app in &mut sandbox_config.apps {
        app.callback_url = None;
    }
    let app = sandbox_config.apps[0].clone();
    let sandbox = Sandbox::new(sandbox_config);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let sandbox_url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        sandbox
            .clone()
            .serve(listener, shutdown.clone().cancelled_owned()),
    );
    let mut token_config = TokenServiceConfig::default();
    token_config.redis.key_prefix = redis_prefix.clone();
    token_config.accounts.insert(
        ACCOUNT.into(),
        AccountConfig {
            appid: app.appid.clone(),
            secret: Some(app.secret.clone()),
            base_url: sandbox_url.clone(),
            ..Default::default()
        },
    );
    let auth_token = token_config.auth_token.clone();
    let tokens = TokenService::new(token_config).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let token_url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(tokens.serve(listener, shutdown.clone().cancelled_owned()));

    // Database, topology and the queued jobs.
    herald_store::ensure_database(&db_url).await?;
    let amqp = AmqpSettings {
        prefix: prefix.clone(),
        ..Default::default()
    };
    let broker = Broker::connect(&amqp, "bench").await?;
    broker.declare_topology().await?;
    let store = Store::connect(
        &StoreSettings {
            url: db_url.clone(),
            pool_size: 4,
        },
        &broker.topology().status_exchange(),
    )
    .await?;
    store.migrate().await?;
    store.upsert_tenant(TENANT, "Bench", None).await?;
    store
        .upsert_provider_account(
            ACCOUNT,
            TENANT,
            "wechat_official_account",
            channels::WECHAT_TEMPLATE,
            &app.appid,
            true,
        )
        .await?;
    let worker_env = [
        ("HERALD_AMQP__PREFIX", prefix.clone()),
        ("HERALD_POSTGRES__URL", db_url.clone()),
        ("HERALD_SENDER__WECHAT_BASE_URL", sandbox_url),
        ("HERALD_SENDER__REDIS__KEY_PREFIX", redis_prefix.clone()),
        ("HERALD_TOKEN_SERVICE__URL", token_url),
        ("HERALD_TOKEN_SERVICE__AUTH_TOKEN", auth_token),
        ("HERALD_TELEMETRY__LOG_FILTER", "warn".to_string()),
    ];
    let result = run(&broker, &store, &sandbox, jobs, &worker_env).await;

    shutdown.cancel();
    let _ = broker.delete_topology().await;
    broker.close().await;
    drop(store);
    herald_store::drop_database(&db_url).await?;
    if let Ok(client) = redis::Client::open("redis://127.0.0.1:6379/")
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{redis_prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
        }
    }
    result
}

async fn run(
    broker: &Broker,
    store: &Store,
    sandbox: &Sandbox,
    jobs: usize,
    worker_env: &[(&str, String)],
) -> anyhow::Result<()> {
    let prepared = Instant::now();
    let payload: herald_contract::Struct = serde_json::from_value(serde_json::json!({
        "template_id": "tmpl_order_shipped",
        "data": {"order_id": {"value": "A-1"}, "carrier": {"value": "SF"}, "eta": {"value": "soon"}}
    }))?;
    let exchange = broker.topology().deliveries_exchange();
    for n in 0..jobs {
        let message_id = Uuid::now_v7();
        let delivery_id = Uuid::now_v7();
        let openid = format!("oBench{n:022}");
        store
            .ensure_message(NewMessage {
                id: message_id,
                tenant_id: TENANT.into(),
                template_id: "order_shipped".into(),
                idempotency_key: None,
                request: "{}".into(),
                request_hash: message_id.as_bytes().to_vec(),
                source: "amqp",
                traceparent: None,
            })
            .await?;
        store
            .create_deliveries(
                message_id,
                TENANT,
                &[NewDelivery {
                    id: delivery_id,
                    channel: channels::WECHAT_TEMPLATE.into(),
                    provider_account: ACCOUNT.into(),
                    recipient: openid.clone(),
                }],
            )
            .await?;
        let job = DeliveryJob {
            delivery_id: delivery_id.to_string(),
            message_id: message_id.to_string(),
            tenant: TENANT.into(),
            channel: channels::WECHAT_TEMPLATE.into(),
            provider_account: ACCOUNT.into(),
            recipient: openid,
            payload: Some(payload.clone()),
            attempt: 1,
            ..Default::default()
        };
        let mut table = FieldTable::default();
        table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(1));
        broker
            .publisher()
            .publish(
                &exchange,
                channels::WECHAT_TEMPLATE,
                &encode_json(&job),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_headers(table),
            )
            .await?;
    }
    eprintln!("queued {jobs} jobs in {:?}", prepared.elapsed());

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald-sender"))
        .env_remove("HERALD_CONFIG")
        .envs(worker_env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(std::env::temp_dir())
        .spawn()
        .context("start herald-sender")?;
    let pid = child.id();

    let first = sandbox
        .wait_for_accepted_sends(1, Duration::from_secs(60))
        .await;
    if first.is_empty() {
        let _ = child.kill();
        bail!("the worker sent nothing within 60 s");
    }
    let cpu_start = cpu_seconds(pid)?;
    let all = sandbox
        .wait_for_accepted_sends(jobs, Duration::from_secs(600))
        .await;
    let cpu_end = cpu_seconds(pid)?;
    let _ = child.kill();
    let _ = child.wait();
    if all.len() < jobs {
        bail!("only {} of {jobs} sent", all.len());
    }
    let wall = (all[jobs - 1].at - all[0].at)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64();
    let sends = (jobs - 1) as f64;
    let cpu = cpu_end - cpu_start;
    println!("sender throughput: {jobs} jobs, one worker, default settings");
    println!("  sends/s          {:.0}", sends / wall);
    println!("  CPU per send     {:.3} ms", cpu * 1000.0 / sends);
    println!("  worker CPU use   {:.0}% of one core", cpu / wall * 100.0);
    println!("  wall             {wall:.2} s (first send to last)");
    Ok(())
}

/// User + system CPU seconds of a process so far (`/proc/<pid>/stat` fields 14 and 15, in
/// USER_HZ = 100 ticks a second on Linux).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14, stime field 15.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("short /proc stat")?
            .parse::<u64>()? as f64)
    };
    Ok((ticks(14)? + ticks(15)?) / 100.0)
}
