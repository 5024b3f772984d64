//! `herald-bench`: drives Herald end to end on one machine and reports throughput, per-stage
//! latency, CPU and memory per process, start-up times, and the bare broker's two-hop ceiling
//! measured in the same run. See docs/benchmarks.md.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/herald-bench --messages 5000 --half-rate
//! target/release/herald-bench --scenario urgent-under-backlog --backlog 100000
//! ```
//!
//! Every service (`herald-sandbox`, `herald-token`, `herald-ingress`, `herald-renderer`,
//! `herald-sender`, `herald-callback`) runs as its own child process from the release build,
//! configured by one generated `herald.toml` with a private AMQP prefix, database and Redis key
//! prefix, all removed afterwards.

mod ceiling;
mod load;
mod procs;
mod report;
mod run;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use heraldctl::HeraldConfig;
use uuid::Uuid;

use crate::procs::{Service, free_port};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Amqp,
    Rest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// The ceiling, then N notifications as fast as possible (or at --rate); with
    /// --half-rate a second run at half the measured maximum.
    Throughput,
    /// A bulk backlog (--backlog deliveries) queued, then urgent notifications timed through it.
    UrgentUnderBacklog,
    /// Both, in one start of the services.
    All,
}

#[derive(Debug, Parser)]
#[command(version, about = "Herald end-to-end load tool (docs/benchmarks.md)")]
pub struct Args {
    #[arg(long, value_enum, default_value = "throughput")]
    pub scenario: Scenario,
    /// How producers hand requests to Herald.
    #[arg(long, value_enum, default_value = "amqp")]
    pub via: Via,
    /// Notifications (one recipient each) in the throughput run.
    #[arg(long, default_value_t = 5000)]
    pub messages: usize,
    /// Requests per second; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// After the throughput run, another at half its measured sustained rate.
    #[arg(long)]
    pub half_rate: bool,
    /// Notifications in the half-rate run (default: half of --messages).
    #[arg(long)]
    pub half_rate_messages: Option<usize>,
    /// Outstanding publisher confirms (AMQP) or requests in flight (REST).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// The sandbox answers each template send this much later (0: at once).
    #[arg(long, default_value_t = 0)]
    pub provider_latency_ms: u64,
    /// The sandbox's delay between a send and its TEMPLATESENDJOBFINISH callback.
    #[arg(long, default_value_t = 0)]
    pub callback_delay_ms: u64,
    /// Bulk deliveries queued before the urgent ones (urgent-under-backlog).
    #[arg(long, default_value_t = 100_000)]
    pub backlog: usize,
    /// Recipients per bulk request (a campaign fans out; at most 10,000).
    #[arg(long, default_value_t = 1000)]
    pub backlog_fanout: usize,
    /// Urgent notifications timed through the backlog.
    #[arg(long, default_value_t = 50)]
    pub urgent: usize,
    /// Urgent notifications per second.
    #[arg(long, default_value_t = 5.0)]
    pub urgent_rate: f64,
    /// Messages through the broker ceiling (default: --messages).
    #[arg(long)]
    pub ceiling_messages: Option<usize>,
    #[arg(long)]
    pub no_ceiling: bool,
    /// Directory of the release binaries (default: this executable's).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Report files: <out>.json and <out>.md.
    #[arg(long, default_value = "herald-bench-report")]
    pub out: PathBuf,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Postgres server (trust auth); the run's database is created and dropped on it.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub postgres: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    pub redis_url: String,
    /// Keep the services' logs and configuration (printed at the end).
    #[arg(long)]
    pub keep: bool,
    /// Diagnostics: `log_statement = 'all'` on the run's database (Postgres' server log shows
    /// every statement Herald sends, prefixed with the database name). Perturbs timing.
    #[arg(long)]
    pub pg_log_statements: bool,
    /// Seconds to wait for a run's notifications to settle.
    #[arg(long, default_value_t = 900)]
    pub settle_timeout: u64,
}

/// Everything one invocation creates, to remove at the end.
pub struct Env {
    pub id: String,
    pub config: HeraldConfig,
    pub config_path: PathBuf,
    pub work_dir: PathBuf,
    pub sandbox_url: String,
    pub ingress_url: String,
    pub admin_ports: Vec<(&'static str, u16)>,
}

fn build_env(args: &Args) -> anyhow::Result<Env> {
    let id = Uuid::new_v4().simple().to_string()[..10].to_string();
    let work_dir = std::env::temp_dir().join(format!("herald-bench-{id}"));
    std::fs::create_dir_all(&work_dir)?;
    let mut config = HeraldConfig::default().with_demo_account();
    config.amqp.url = args.amqp_url.clone();
    config.amqp.prefix = format!("herald-bench-{id}");
    config.postgres.url = format!("{}/herald_bench_{id}", args.postgres.trim_end_matches('/'));
    let redis_prefix = format!("herald-bench-{id}:");
    config.token.redis.url = args.redis_url.clone();
    config.token.redis.key_prefix = redis_prefix.clone();
    config.sender.redis.url = args.redis_url.clone();
    config.sender.redis.key_prefix = redis_prefix;
    config.telemetry.log_filter = "warn,lapin=error".into();

    let sandbox = format!("127.0.0.1:{}", free_port()?);
    let token = format!("127.0.0.1:{}", free_port()?);
    let ingress = format!("127.0.0.1:{}", free_port()?);
    let callback = format!("127.0.0.1:{}", free_port()?);
    config.sandbox.callback_delay_ms = args.callback_delay_ms;
    heraldctl::stack::wire(&mut config, &sandbox, &token, &ingress, &callback);
    let sandbox_url = format!("http://{sandbox}");
    let mut admin_ports = Vec::new();
    for name in ["token", "ingress", "renderer", "sender", "callback"] {
        admin_ports.push((name, free_port()?));
    }
    let config_path = work_dir.join("herald.toml");
    std::fs::write(
        &config_path,
        toml::to_string(&config).context("writing the run's herald.toml")?,
    )?;
    Ok(Env {
        id,
        config,
        config_path,
        work_dir,
        sandbox_url,
        ingress_url: format!("http://{ingress}"),
        admin_ports,
    })
}

/// Starts the sandbox, waits for it, then starts the five services at once and waits for
/// each `/readyz`.
async fn start_services(
    args: &Args,
    env: &Env,
    http: &reqwest::Client,
    services: &mut Vec<Service>,
) -> anyhow::Result<()> {
    let dir = procs::bin_dir(args.bin_dir.as_deref())?;
    let base = vec![(
        "HERALD_CONFIG".to_string(),
        env.config_path.display().to_string(),
    )];
    let sandbox = Service::spawn(
        "sandbox",
        &dir,
        "herald-sandbox",
        &base,
        format!("{}/_sandbox/callbacks", env.sandbox_url),
        &env.work_dir.join("sandbox.log"),
    )?;
    services.push(sandbox);
    services[0]
        .wait_ready(http, Duration::from_secs(30))
        .await?;
    for (name, port) in &env.admin_ports {
        let mut vars = base.clone();
        vars.push((
            "HERALD_TELEMETRY__ADMIN_LISTEN".into(),
            format!("127.0.0.1:{port}"),
        ));
        services.push(Service::spawn(
            name,
            &dir,
            &format!("herald-{name}"),
            &vars,
            format!("http://127.0.0.1:{port}/readyz"),
            &env.work_dir.join(format!("{name}.log")),
        )?);
    }
    for service in services.iter_mut().skip(1) {
        if let Err(e) = service.wait_ready(http, Duration::from_secs(60)).await {
            let log = std::fs::read_to_string(env.work_dir.join(format!("{}.log", service.name)))
                .unwrap_or_default();
            bail!("{e}\n--- {} log ---\n{log}", service.name);
        }
    }
    Ok(())
}

async fn cleanup(env: &Env, args: &Args) {
    if let Ok(broker) = herald_amqp::Broker::connect(&env.config.amqp, "bench-cleanup").await {
        let _ = broker.delete_topology().await;
        broker.close().await;
    }
    if let Err(e) = herald_store::drop_database(&env.config.postgres.url).await {
        eprintln!("could not drop the run's database: {e}");
    }
    if let Ok(client) = redis::Client::open(args.redis_url.as_str())
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("herald-bench-{}:*", env.id))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
        }
    }
    if args.keep {
        eprintln!("kept logs and configuration in {}", env.work_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&env.work_dir);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.backlog_fanout == 0 || args.backlog_fanout > 10_000 {
        bail!("--backlog-fanout must be 1..=10000");
    }
    let env = build_env(&args)?;
    eprintln!(
        "run {}: prefix {}, database {}",
        env.id, env.config.amqp.prefix, env.config.postgres.url
    );
    heraldctl::stack::prepare(&env.config)
        .await
        .context("preparing the database and topology")?;
    if args.pg_log_statements {
        let (client, connection) =
            tokio_postgres::connect(&env.config.postgres.url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let name = env
            .config
            .postgres
            .url
            .rsplit('/')
            .next()
            .unwrap_or_default();
        client
            .batch_execute(&format!(
                "ALTER DATABASE \"{name}\" SET log_statement = 'all'"
            ))
            .await?;
        eprintln!("logging every statement of database {name}");
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.window)
        .build()?;
    let mut services = Vec::new();
    let result = async {
        // The ceiling runs first, before any Herald process exists, on the same broker.
        let body_bytes = load::request(
            Uuid::now_v7(),
            &[load::openid("x", 0)],
            "A-000000",
            herald_contract::v1::Priority::Unspecified,
        )
        .body
        .len();
        let ceiling = if args.no_ceiling {
            None
        } else {
            eprintln!("broker ceiling …");
            let ceiling = ceiling::run(
                &args.amqp_url,
                &env.config.amqp.prefix,
                args.ceiling_messages.unwrap_or(args.messages),
                body_bytes,
                args.window,
                env.config.amqp.prefetch,
            )
            .await?;
            eprintln!(
                "  two-hop ceiling: {:.0} msg/s sustained",
                ceiling.sustained_per_sec
            );
            Some(ceiling)
        };
        eprintln!("starting services …");
        start_services(&args, &env, &http, &mut services).await?;
        let report = run::run_all(&args, &env, &http, &mut services, ceiling, body_bytes).await?;
        Ok::<_, anyhow::Error>(report)
    }
    .await;
    for service in services.iter_mut().rev() {
        service.stop().await;
    }
    cleanup(&env, &args).await;
    let report = result?;
    report::print(&report);
    report::write(&report, &args.out)?;
    eprintln!(
        "wrote {}.json and {}.md",
        args.out.display(),
        args.out.display()
    );
    Ok(())
}
