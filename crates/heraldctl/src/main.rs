//! `heraldctl`: run Herald on a laptop, migrate, declare the topology, send a demo
//! notification and follow it, look a message up.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use herald_amqp::{AMQPValue, BasicProperties, Broker, FieldTable};
use herald_contract::v1::{DeliveryState, StatusEvent};
use herald_contract::{SCHEMA_VERSION, decode_json, encode_json, headers};
use herald_store::Store;
use heraldctl::{HeraldConfig, Stack, demo, dlq, stack, templates};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "heraldctl",
    version,
    about = "Operate Herald, the notification service"
)]
struct Cli {
    /// Configuration file (default: ./herald.toml if present; HERALD_* variables override).
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service and the provider sandbox in this process, with a demo tenant.
    Up,
    /// Create the database if needed and apply migrations.
    Migrate,
    /// Prepare a development deployment: database, migrations, topology and the demo tenant
    /// (what `up` does before starting the services).
    Seed,
    /// Declare the exchanges and queues (idempotent) and list them.
    Topology,
    /// Send the demo notification and print its status changes until it settles.
    Send {
        /// Go through the REST gateway instead of publishing over AMQP.
        #[arg(long)]
        rest: bool,
        /// Recipient openid.
        #[arg(long, default_value = demo::OPENID)]
        openid: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Show a message with its deliveries and their timelines.
    Status { id: Uuid },
    /// Inspect and act on the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Manage the recipient directory (user id -> addresses and preferences).
    Recipients {
        #[command(subcommand)]
        command: heraldctl::recipients::RecipientsCommand,
    },
    /// Manage templates through the ingress API.
    Templates {
        #[command(subcommand)]
        command: TemplatesCommand,
    },
}

#[derive(Subcommand)]
enum TemplatesCommand {
    /// Create and publish a version of every template file (*.yaml) in a directory whose
    /// definition changed; unchanged files create nothing.
    Apply {
        /// The directory of template files.
        #[arg(short = 'f', long = "file")]
        dir: PathBuf,
        /// The ingress base URL (default: http://<ingress.listen>).
        #[arg(long, env = "HERALD_INGRESS_URL")]
        url: Option<String>,
        /// The tenant's API key (default: the demo tenant's).
        #[arg(long, env = "HERALD_API_KEY", default_value = demo::API_KEY, hide_default_value = true)]
        api_key: String,
        /// Only validate and say what would change.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List parked messages (nothing is removed).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show parked messages in full (headers and body); the id may be a prefix.
    Show {
        id: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Publish parked messages back to the queues they came from (confirmed, then removed
    /// from the dead-letter queue).
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Start the attempt count again at 1 and reopen deliveries failed by exhaustion.
        #[arg(long)]
        reset_attempts: bool,
    },
    /// Delete parked messages.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Really delete (without it, only says how many would go).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(clap::Args)]
struct FilterArgs {
    /// Only this message id (or id prefix; delivery jobs carry their delivery id).
    #[arg(long)]
    id: Option<String>,
    /// Only this reason (exhausted, decode_error, unknown_tenant, delivery_limit, ...).
    #[arg(long)]
    reason: Option<String>,
    /// Only delivery jobs of this channel.
    #[arg(long)]
    channel: Option<String>,
    /// Only messages parked at least this long ago (90s, 15m, 2h, 3d).
    #[arg(long, value_parser = parse_age)]
    older_than: Option<Duration>,
    /// Only messages parked at most this long ago.
    #[arg(long, value_parser = parse_age)]
    newer_than: Option<Duration>,
}

impl FilterArgs {
    fn filter(self) -> dlq::Filter {
        dlq::Filter {
            id: self.id,
            reason: self.reason,
            channel: self.channel,
            older_than: self.older_than,
            newer_than: self.newer_than,
        }
    }
}

fn parse_age(text: &str) -> Result<Duration, String> {
    dlq::parse_age(text).ok_or_else(|| format!("`{text}` is not an age like 90s, 15m, 2h or 3d"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: HeraldConfig = herald_config::load(cli.config.as_deref())?;
    let config = config.with_demo_account();
    let _telemetry = herald_telemetry::init("heraldctl", &config.telemetry);
    match cli.command {
        Command::Up => up(config).await,
        Command::Migrate => {
            if herald_store::ensure_database(&config.postgres.url).await? {
                println!("created database");
            }
            let store = Store::connect(&config.postgres, "").await?;
            store.migrate().await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Seed => {
            stack::prepare(&config).await?;
            println!(
                "seeded tenant `{}` (API key {}, AMQP user {})",
                demo::TENANT,
                demo::API_KEY,
                demo::amqp_user(&config.amqp.url)
            );
            Ok(())
        }
        Command::Topology => {
            let broker = Broker::connect(&config.amqp, "heraldctl").await?;
            broker.declare_topology().await?;
            for (queue, bindings) in broker.topology().describe() {
                let bound: Vec<String> =
                    bindings.iter().map(|(e, k)| format!("{e} [{k}]")).collect();
                println!("{queue:32} <- {}", bound.join(", "));
            }
            broker.close().await;
            Ok(())
        }
        Command::Send {
            rest,
            openid,
            timeout,
        } => send(config, rest, &openid, timeout).await,
        Command::Dlq { command } => dlq_command(config, command).await,
        Command::Recipients { command } => heraldctl::recipients::run(&config, command).await,
        Command::Templates {
            command:
                TemplatesCommand::Apply {
                    dir,
                    url,
                    api_key,
                    dry_run,
                },
        } => {
            let url = url.unwrap_or_else(|| format!("http://{}", config.ingress.listen));
            let applied =
                templates::apply(&reqwest::Client::new(), &url, &api_key, &dir, dry_run).await?;
            for a in applied {
                let what = match a.outcome {
                    templates::Outcome::Unchanged { version } => {
                        format!("unchanged (version {version})")
                    }
                    templates::Outcome::Published {
                        version,
                        created: true,
                    } => format!("created and published version {version}"),
                    templates::Outcome::Published {
                        version,
                        created: false,
                    } => format!("published version {version}"),
                    templates::Outcome::WouldCreate => "would create and publish a version".into(),
                    templates::Outcome::WouldPublish { version } => {
                        format!("would publish version {version}")
                    }
                };
                println!("{:24} {what}  ({})", a.id, a.path.display());
            }
            Ok(())
        }
        Command::Status { id } => {
            let store = Store::connect(&config.postgres, "").await?;
            let view = store
                .message_view(demo::TENANT, id)
                .await?
                .with_context(|| format!("no message {id} for tenant {}", demo::TENANT))?;
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(())
        }
    }
}

async fn up(config: HeraldConfig) -> anyhow::Result<()> {
    let shutdown = herald_config::shutdown_on_signal();
    let mut stack = Stack::start(config).await?;
    println!(
        "Herald is up.\n\
         \x20 REST ingress     {ingress}  (API key: {key})\n\
         \x20 AMQP requests    exchange {requests} on {amqp}, user_id {user}\n\
         \x20 callbacks        {callback}/v1/callbacks/wechat/{account}\n\
         \x20 token service    {token}\n\
         \x20 WeChat sandbox   {sandbox}  (request log: {sandbox}/_sandbox/requests)\n\
         Try: heraldctl send     (or: curl -H 'Authorization: Bearer {key}' {ingress}/v1/messages/<id>)\n\
         Ctrl-C stops everything.",
        ingress = stack.ingress_url,
        key = demo::API_KEY,
        requests = format_args!("{}.requests", stack.config.amqp.prefix),
        amqp = redact(&stack.config.amqp.url),
        user = demo::amqp_user(&stack.config.amqp.url),
        callback = stack.callback_url,
        account = demo::ACCOUNT,
        token = stack.token_url,
        sandbox = stack.sandbox_url,
    );
    tokio::select! {
        _ = shutdown.cancelled() => {}
        stopped = stack.stopped() => {
            if let Some((service, result)) = stopped {
                tracing::error!(service, ?result, "a service stopped; shutting down");
            }
        }
    }
    stack.stop().await;
    Ok(())
}

fn redact(url: &str) -> String {
    match url.split_once('@') {
        Some((scheme_user, host)) => {
            let user = scheme_user.rsplit_once(':').map_or(scheme_user, |(u, _)| u);
            format!("{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

async fn send(config: HeraldConfig, rest: bool, openid: &str, timeout: u64) -> anyhow::Result<()> {
    stack::prepare(&config).await?;
    let broker = Broker::connect(&config.amqp, "heraldctl").await?;
    let topology = broker.topology().clone();
    let mut statuses = broker
        .subscribe_temporary(
            &topology.status_exchange(),
            &format!("status.{}.#", demo::TENANT),
        )
        .await?;
    let order = format!("A-{}", &Uuid::now_v7().simple().to_string()[20..]);
    let mut request = demo::request(openid, &order);
    let id = if rest {
        let url = format!("http://{}/v1/messages", config.ingress.listen);
        let response = reqwest::Client::new()
            .post(&url)
            .bearer_auth(demo::API_KEY)
            .json(&serde_json::from_slice::<serde_json::Value>(&encode_json(
                &request,
            ))?)
            .send()
            .await
            .with_context(|| format!("POST {url} (is `heraldctl up` running?)"))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        if !status.is_success() {
            bail!("ingress answered {status}: {body}");
        }
        let id = body["id"].as_str().unwrap_or_default().to_string();
        println!("accepted over REST: message {id}");
        id
    } else {
        let id = Uuid::now_v7();
        request.id = id.to_string();
        let mut table = FieldTable::default();
        table.insert(
            headers::SCHEMA_VERSION.into(),
            AMQPValue::LongString(SCHEMA_VERSION.into()),
        );
        herald_amqp::trace::inject_current(&mut table);
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(id.to_string().into())
            .with_user_id(demo::amqp_user(&config.amqp.url).into())
            .with_headers(table);
        broker
            .publisher()
            .publish(
                &topology.requests_exchange(),
                "request.demo",
                &encode_json(&request),
                properties,
            )
            .await?;
        println!("published over AMQP: message {id}");
        id.to_string()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let next = tokio::time::timeout_at(deadline, statuses.next()).await;
        let delivery = match next {
            Err(_) => bail!("no final status within {timeout}s (is `heraldctl up` running?)"),
            Ok(None) => bail!("status subscription closed"),
            Ok(Some(delivery)) => delivery?,
        };
        let Ok(event) = decode_json::<StatusEvent>(&delivery.data) else {
            continue;
        };
        if event.message_id != id {
            continue;
        }
        let state = event.state();
        let error = if event.error_code.is_empty() {
            String::new()
        } else {
            format!("  ({} {})", event.error_code, event.error_message)
        };
        println!(
            "  {:10} delivery {} via {}{error}",
            state.name(),
            event.delivery_id,
            event.channel
        );
        if matches!(
            state,
            DeliveryState::Delivered
                | DeliveryState::Failed
                | DeliveryState::Expired
                | DeliveryState::Suppressed
        ) {
            broker.close().await;
            return if state == DeliveryState::Delivered {
                Ok(())
            } else {
                bail!("ended {}", state.name())
            };
        }
    }
}

async fn dlq_command(config: HeraldConfig, command: DlqCommand) -> anyhow::Result<()> {
    let broker = Broker::connect(&config.amqp, "heraldctl").await?;
    let result = run_dlq(&config, &broker, command).await;
    broker.close().await;
    result
}

fn progress_bar(verb: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{verb} {{bar:40}} {{pos}}/{{len}} ({{per_sec}}, {{eta}} left)"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

async fn run_dlq(
    config: &HeraldConfig,
    broker: &Broker,
    command: DlqCommand,
) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    match command {
        DlqCommand::List { filter, json } => {
            let letters = dlq::list(broker, &filter.filter()).await?;
            if json {
                for letter in &letters {
                    println!("{}", serde_json::to_string(letter)?);
                }
                return Ok(());
            }
            println!(
                "{:38} {:16} {:24} {:>8} {:>7}  DETAIL",
                "ID", "REASON", "ORIGIN", "AGE", "ATTEMPT"
            );
            for l in &letters {
                let origin = match (&l.channel, l.lane) {
                    (Some(channel), Some(lane)) => format!("{channel} [{}]", lane.name()),
                    _ => l.queue.clone().unwrap_or_else(|| "?".into()),
                };
                let age = l
                    .dead_at
                    .and_then(|at| (now - at).to_std().ok())
                    .map(|d| format!("{}s", d.as_secs()))
                    .unwrap_or_else(|| "?".into());
                let detail: String = l.detail.chars().take(60).collect();
                println!(
                    "{:38} {:16} {:24} {:>8} {:>7}  {detail}",
                    l.id,
                    l.reason,
                    origin,
                    age,
                    l.attempt.map(|a| a.to_string()).unwrap_or_default()
                );
            }
            println!("{} parked message(s)", letters.len());
            Ok(())
        }
        DlqCommand::Show { id, filter } => {
            let mut filter = filter.filter();
            filter.id = Some(id.clone());
            let letters = dlq::list(broker, &filter).await?;
            if letters.is_empty() {
                bail!("no parked message with id {id}");
            }
            for letter in letters {
                println!("{}", serde_json::to_string_pretty(&letter)?);
            }
            Ok(())
        }
        DlqCommand::Replay {
            filter,
            reset_attempts,
        } => {
            let store = if reset_attempts {
                Some(Store::connect(&config.postgres, &broker.topology().status_exchange()).await?)
            } else {
                None
            };
            let bar = progress_bar("replaying");
            let progress = |done: u64, total: u64| {
                bar.set_length(total);
                bar.set_position(done);
            };
            let stop = herald_config::shutdown_on_signal();
            let report = dlq::replay(
                broker,
                store.as_ref(),
                &filter.filter(),
                reset_attempts,
                &progress,
                &stop,
            )
            .await?;
            bar.finish_and_clear();
            println!(
                "replayed {}, reopened {} failed deliveries{}",
                report.replayed,
                report.reopened,
                if report.interrupted {
                    " (interrupted: the rest stay parked)"
                } else {
                    ""
                }
            );
            for (id, why) in &report.skipped {
                println!("  left parked {id}: {why}");
            }
            Ok(())
        }
        DlqCommand::Purge { filter, yes } => {
            let filter = filter.filter();
            if !yes {
                let n = dlq::list(broker, &filter).await?.len();
                println!("{n} parked message(s) match; run again with --yes to delete them");
                return Ok(());
            }
            let bar = progress_bar("purging");
            let progress = |done: u64, total: u64| {
                bar.set_length(total);
                bar.set_position(done);
            };
            let stop = herald_config::shutdown_on_signal();
            let purged = dlq::purge(broker, &filter, &progress, &stop).await?;
            bar.finish_and_clear();
            println!("purged {purged} parked message(s)");
            Ok(())
        }
    }
}
