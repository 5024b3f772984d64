//! The runs: warm-up, throughput (max and half rate), urgent under a bulk backlog; and the
//! per-notification timeline from what the system records.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use herald_amqp::{Lane, Topology};
use herald_contract::channels;
use herald_contract::v1::Priority;
use lapin::Connection;
use serde::Serialize;
use uuid::Uuid;

use crate::ceiling::Ceiling;
use crate::load::{self, Outgoing, Published, StatusTimes, now};
use crate::procs::{self, Service};
use crate::stats::{Percentiles, sustained_rate};
use crate::{Args, Env, Scenario, Via};

const DELIVERED: i32 = herald_contract::v1::DeliveryState::Delivered as i32;
const FAILED: i32 = herald_contract::v1::DeliveryState::Failed as i32;

/// One notification's way through the system, in Unix seconds from one clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeline {
    /// Producer: publish call / POST sent.
    pub published: f64,
    /// Producer: publisher confirm / 202 received.
    pub accepted: Option<f64>,
    /// `deliveries` history: rendered and queued (renderer's transaction).
    pub rendered: Option<f64>,
    /// History: claimed by a sender (`sending`).
    pub claimed: Option<f64>,
    /// Sandbox: the template send arrived.
    pub provider: Option<f64>,
    /// History: outcome stored (`sent`).
    pub sent: Option<f64>,
    /// History: the provider's callback projected (`delivered`).
    pub delivered: Option<f64>,
    /// Producer: the `delivered` status event arrived.
    pub status: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub name: &'static str,
    #[serde(flatten)]
    pub latency: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessCpu {
    pub name: String,
    pub cpu_seconds: f64,
    pub cpu_ms_per_notification: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub name: String,
    pub via: Via,
    pub notifications: usize,
    /// Requested rate (None: as fast as possible).
    pub target_rate: Option<f64>,
    pub publish_per_sec: f64,
    /// Provider receipts per second, 10th to 90th percentile.
    pub sustained_provider_per_sec: f64,
    /// `delivered` status events at the producer per second, 10th to 90th percentile.
    pub sustained_settled_per_sec: f64,
    /// First publish → last settled.
    pub wall_seconds: f64,
    pub incomplete: usize,
    pub cumulative: Vec<Stage>,
    pub segments: Vec<Stage>,
    /// CPU seconds per process over the run (publish → all settled), and per notification.
    pub cpu: Vec<ProcessCpu>,
    /// Busy share of the whole machine over the run (2 cores = 200%).
    pub machine_busy_percent: f64,
    pub load_average: Option<f64>,
    /// The run's database per notification (`pg_stat_database` deltas): committed
    /// transactions, rows inserted, updated, deleted.
    pub db_per_notification: Option<DbWork>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct DbWork {
    pub commits: f64,
    pub inserted: f64,
    pub updated: f64,
    pub deleted: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BacklogReport {
    pub backlog: usize,
    pub fanout: usize,
    pub bulk_requests: usize,
    /// Publish of the first bulk request → every bulk delivery rendered and queued.
    pub render_seconds: f64,
    /// Urgent notifications published right after the bulk requests, while those still
    /// waited in the render queue.
    pub during_render: Vec<Stage>,
    /// Urgent notifications published once the whole backlog was queued on the bulk lane.
    pub during_send_backlog: Vec<Stage>,
    pub bulk_lane_depth_before: u32,
    pub bulk_lane_depth_after: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Startup {
    pub name: &'static str,
    pub ready_ms: Option<f64>,
    pub peak_rss_mib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub model: String,
    pub started_at: String,
    pub load_average_at_start: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub body_bytes: usize,
    pub provider_latency_ms: u64,
    pub callback_delay_ms: u64,
    pub window: usize,
    pub ceiling: Option<Ceiling>,
    pub services: Vec<Startup>,
    pub runs: Vec<RunReport>,
    pub backlog: Option<BacklogReport>,
}

struct Ctx<'a> {
    args: &'a Args,
    env: &'a Env,
    http: &'a reqwest::Client,
    topology: Topology,
    amqp: Connection,
    publish_channel: lapin::Channel,
    status: StatusTimes,
    db: tokio_postgres::Client,
    user: String,
}

fn delivery_id(message: Uuid, index: usize) -> Uuid {
    Uuid::new_v5(
        &message,
        format!("{index}/{}", channels::WECHAT_TEMPLATE).as_bytes(),
    )
}

fn machine() -> Machine {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(0),
        model,
        started_at: chrono::Utc::now().to_rfc3339(),
        load_average_at_start: procs::load_average(),
    }
}

pub async fn run_all(
    args: &Args,
    env: &Env,
    http: &reqwest::Client,
    services: &mut [Service],
    ceiling: Option<Ceiling>,
    body_bytes: usize,
) -> anyhow::Result<Report> {
    let topology = Topology::new(&env.config.amqp).map_err(|e| anyhow::anyhow!(e))?;
    let amqp = load::connect(&args.amqp_url, "herald-bench-producer").await?;
    let publish_channel = load::confirmed_channel(&amqp).await?;
    let status =
        load::listen_status(&amqp, &topology.status_exchange(), heraldctl::demo::TENANT).await?;
    let (db, connection) = tokio_postgres::connect(&env.config.postgres.url, tokio_postgres::NoTls)
        .await
        .context("connecting to the run's database")?;
    tokio::spawn(connection);
    let ctx = Ctx {
        args,
        env,
        http,
        topology,
        amqp,
        publish_channel,
        status,
        db,
        user: heraldctl::demo::amqp_user(&args.amqp_url),
    };
    let mut report = Report {
        machine: machine(),
        body_bytes,
        provider_latency_ms: args.provider_latency_ms,
        callback_delay_ms: args.callback_delay_ms,
        window: args.window,
        ceiling,
        services: Vec::new(),
        runs: Vec::new(),
        backlog: None,
    };

    // Warm-up: tokens fetched, template cached, pools and connections open.
    eprintln!("warm-up …");
    ctx.throughput("warm-up", 20, None, "w", services).await?;

    if matches!(args.scenario, Scenario::Throughput | Scenario::All) {
        let rate = (args.rate > 0.0).then_some(args.rate);
        eprintln!("throughput run: {} notifications …", args.messages);
        let max = ctx
            .throughput("max", args.messages, rate, "m", services)
            .await?;
        eprintln!(
            "  {:.0}/s to the provider, {:.0}/s settled",
            max.sustained_provider_per_sec, max.sustained_settled_per_sec
        );
        let half = max
            .sustained_provider_per_sec
            .min(max.sustained_settled_per_sec)
            / 2.0;
        report.runs.push(max);
        if args.half_rate && half.is_finite() && half > 0.0 {
            let n = args.half_rate_messages.unwrap_or(args.messages / 2).max(10);
            eprintln!("half-rate run: {n} notifications at {half:.0}/s …");
            let run = ctx
                .throughput("half-rate", n, Some(half), "h", services)
                .await?;
            report.runs.push(run);
        }
    }
    if matches!(args.scenario, Scenario::UrgentUnderBacklog | Scenario::All) {
        report.backlog = Some(ctx.backlog().await?);
    }
    for service in services.iter_mut() {
        let alive = service.alive();
        report.services.push(Startup {
            name: service.name,
            ready_ms: service.ready_after.map(|d| d.as_secs_f64() * 1000.0),
            peak_rss_mib: alive
                .then(|| procs::peak_rss_kib(service.pid))
                .flatten()
                .map(|kib| kib as f64 / 1024.0),
        });
    }
    let _ = ctx.amqp.close(200, "OK".into()).await;
    Ok(report)
}

impl Ctx<'_> {
    async fn publish(
        &self,
        requests: Vec<Outgoing>,
        rate: Option<f64>,
    ) -> anyhow::Result<Vec<Published>> {
        match self.args.via {
            Via::Amqp => {
                load::publish_amqp(
                    &self.publish_channel,
                    &self.topology.requests_exchange(),
                    &self.user,
                    requests,
                    rate,
                    self.args.window,
                )
                .await
            }
            Via::Rest => {
                load::post_rest(
                    self.http,
                    &format!("{}/v1/messages", self.env.ingress_url),
                    heraldctl::demo::API_KEY,
                    requests,
                    rate,
                    self.args.window,
                )
                .await
            }
        }
    }

    /// The sandbox answers the next `calls` template sends `--provider-latency-ms` late.
    async fn inject_latency(&self, calls: usize) -> anyhow::Result<()> {
        if self.args.provider_latency_ms == 0 {
            return Ok(());
        }
        let fault = serde_json::json!({"kind": "delay", "ms": self.args.provider_latency_ms});
        let mut left = calls;
        while left > 0 {
            let chunk = left.min(10_000);
            let response = self
                .http
                .post(format!("{}/_sandbox/faults", self.env.sandbox_url))
                .json(&serde_json::json!({
                    "path": herald_sandbox::paths::TEMPLATE_SEND,
                    "faults": vec![fault.clone(); chunk],
                }))
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("sandbox refused the latency faults: {}", response.status());
            }
            left -= chunk;
        }
        Ok(())
    }

    /// Waits until every delivery has a `delivered` or `failed` status event at the producer.
    async fn settle(&self, deliveries: &[Uuid]) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(self.args.settle_timeout);
        loop {
            let missing = {
                let times = self
                    .status
                    .lock()
                    .map_err(|_| anyhow::anyhow!("status listener poisoned"))?;
                deliveries
                    .iter()
                    .filter(|d| {
                        !times.contains_key(&(**d, DELIVERED))
                            && !times.contains_key(&(**d, FAILED))
                    })
                    .count()
            };
            if missing == 0 || Instant::now() > deadline {
                return Ok(missing);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Committed transactions and rows inserted, updated, deleted in the run's database so far.
    async fn db_counters(&self) -> Option<[f64; 4]> {
        // The statistics are flushed by backends about once a second.
        let row = self
            .db
            .query_one(
                "SELECT xact_commit::float8, tup_inserted::float8, tup_updated::float8,
                        tup_deleted::float8
                   FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await
            .ok()?;
        Some([row.get(0), row.get(1), row.get(2), row.get(3)])
    }

    fn cpu_snapshot(&self, services: &[Service]) -> Vec<(String, f64)> {
        let mut snapshot: Vec<(String, f64)> = services
            .iter()
            .map(|s| (s.name.to_string(), procs::cpu_seconds(s.pid).unwrap_or(0.0)))
            .collect();
        snapshot.push(("postgres (all backends)".into(), 0.0));
        snapshot.push(("rabbitmq (beam.smp)".into(), 0.0));
        snapshot.push((
            "herald-bench (producer)".into(),
            procs::cpu_seconds(std::process::id()).unwrap_or(0.0),
        ));
        snapshot
    }

    /// Timelines of these messages' first deliveries from Postgres, the sandbox and the status
    /// listener.
    async fn timelines(&self, published: &[Published]) -> anyhow::Result<Vec<Timeline>> {
        let ids: Vec<Uuid> = published.iter().map(|p| p.id).collect();
        let rows = self
            .db
            .query(
                "SELECT d.message_id, d.id,
                        extract(epoch from min(e.occurred_at) FILTER (WHERE e.state = 'queued'))::float8,
                        extract(epoch from min(e.occurred_at) FILTER (WHERE e.state = 'sending'))::float8,
                        extract(epoch from min(e.occurred_at) FILTER (WHERE e.state = 'sent'))::float8,
                        extract(epoch from min(e.occurred_at) FILTER (WHERE e.state = 'delivered'))::float8
                   FROM deliveries d JOIN delivery_events e ON e.delivery_id = d.id
                  WHERE d.message_id = ANY($1)
                  GROUP BY d.message_id, d.id",
                &[&ids],
            )
            .await
            .context("reading the history")?;
        let mut history: HashMap<Uuid, [Option<f64>; 4]> = HashMap::new();
        for row in rows {
            let message: Uuid = row.get(0);
            let delivery: Uuid = row.get(1);
            if delivery == delivery_id(message, 0) {
                history.insert(message, [row.get(2), row.get(3), row.get(4), row.get(5)]);
            }
        }
        let sends: Vec<herald_sandbox::AcceptedSend> = self
            .http
            .get(format!("{}/_sandbox/sends", self.env.sandbox_url))
            .send()
            .await?
            .error_for_status()
            .context("the sandbox's send log (GET /_sandbox/sends)")?
            .json()
            .await?;
        let provider: HashMap<&str, f64> = sends
            .iter()
            .filter_map(|s| {
                let at = s.at.timestamp_micros() as f64 / 1e6;
                Some((s.client_msg_id.as_deref()?, at))
            })
            .collect();
        let status = self
            .status
            .lock()
            .map_err(|_| anyhow::anyhow!("status listener poisoned"))?
            .clone();
        Ok(published
            .iter()
            .map(|p| {
                let delivery = delivery_id(p.id, 0);
                let [rendered, claimed, sent, delivered] =
                    history.get(&p.id).copied().unwrap_or_default();
                Timeline {
                    published: p.published,
                    accepted: p.accepted,
                    rendered,
                    claimed,
                    provider: provider
                        .get(delivery.simple().to_string().as_str())
                        .copied(),
                    sent,
                    delivered,
                    status: status.get(&(delivery, DELIVERED)).copied(),
                }
            })
            .collect())
    }

    async fn throughput(
        &self,
        name: &str,
        n: usize,
        rate: Option<f64>,
        tag: &str,
        services: &mut [Service],
    ) -> anyhow::Result<RunReport> {
        let requests: Vec<Outgoing> = (0..n)
            .map(|i| {
                load::request(
                    Uuid::now_v7(),
                    &[load::openid(tag, i)],
                    &format!("A-{i:06}"),
                    Priority::Unspecified,
                )
            })
            .collect();
        let deliveries: Vec<Uuid> = requests.iter().map(|r| delivery_id(r.id, 0)).collect();
        self.inject_latency(n).await?;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let db_before = self.db_counters().await;
        let cpu_before = self.cpu_snapshot(services);
        let postgres_before = procs::cpu_by_pid("postgres");
        let beam_before = procs::cpu_by_pid("beam.smp");
        let machine_before = procs::machine_cpu();
        let start = now();
        let published = self.publish(requests, rate).await?;
        let publish_seconds = now() - start;
        let incomplete = self.settle(&deliveries).await?;
        let end = now();
        let mut cpu_after = self.cpu_snapshot(services);
        // Postgres backends and RabbitMQ: per process, new ones counted whole, so processes
        // that ended during the run (other users' connections, CLI tools) do not subtract.
        for (name, before) in [
            ("postgres (all backends)", &postgres_before),
            ("rabbitmq (beam.smp)", &beam_before),
        ] {
            let now_by_pid = procs::cpu_by_pid(if name.starts_with("postgres") {
                "postgres"
            } else {
                "beam.smp"
            });
            let used: f64 = now_by_pid
                .iter()
                .map(|(pid, cpu)| (cpu - before.get(pid).copied().unwrap_or(0.0)).max(0.0))
                .sum();
            if let Some(slot) = cpu_after.iter_mut().find(|(n, _)| n == name) {
                slot.1 = used;
            }
        }
        let machine_after = procs::machine_cpu();
        for service in services.iter_mut() {
            if !service.alive() {
                bail!("{} exited during the run", service.name);
            }
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let db_after = self.db_counters().await;
        let db_per_notification = match (db_before, db_after) {
            (Some(b), Some(a)) => Some(DbWork {
                commits: (a[0] - b[0]) / n as f64,
                inserted: (a[1] - b[1]) / n as f64,
                updated: (a[2] - b[2]) / n as f64,
                deleted: (a[3] - b[3]) / n as f64,
            }),
            _ => None,
        };
        let timelines = self.timelines(&published).await?;
        let cpu = cpu_before
            .iter()
            .zip(&cpu_after)
            .map(|((name, before), (_, after))| ProcessCpu {
                name: name.clone(),
                cpu_seconds: after - before,
                cpu_ms_per_notification: (after - before) * 1000.0 / n as f64,
            })
            .collect();
        let machine_busy_percent = match (machine_before, machine_after) {
            (Some((b0, _)), Some((b1, _))) => (b1 - b0) / (end - start).max(1e-9) * 100.0,
            _ => f64::NAN,
        };
        let providers: Vec<f64> = timelines.iter().filter_map(|t| t.provider).collect();
        let settled: Vec<f64> = timelines.iter().filter_map(|t| t.status).collect();
        Ok(RunReport {
            name: name.to_string(),
            via: self.args.via,
            notifications: n,
            target_rate: rate,
            publish_per_sec: n as f64 / publish_seconds.max(1e-9),
            sustained_provider_per_sec: sustained_rate(&providers),
            sustained_settled_per_sec: sustained_rate(&settled),
            wall_seconds: end - start,
            incomplete,
            cumulative: cumulative(&timelines),
            segments: segments(&timelines),
            cpu,
            machine_busy_percent,
            load_average: procs::load_average(),
            db_per_notification,
        })
    }

    async fn queue_depth(&self, queue: &str) -> anyhow::Result<u32> {
        let channel = self.amqp.create_channel().await?;
        let depth = herald_amqp::depth::queue_depth(&channel, queue).await;
        let _ = channel.close(200, "OK".into()).await;
        Ok(depth?)
    }

    async fn urgent_batch(&self, tag: &str, n: usize) -> anyhow::Result<Vec<Timeline>> {
        let requests: Vec<Outgoing> = (0..n)
            .map(|i| {
                load::request(
                    Uuid::now_v7(),
                    &[load::openid(tag, i)],
                    &format!("U-{i:06}"),
                    Priority::Urgent,
                )
            })
            .collect();
        let deliveries: Vec<Uuid> = requests.iter().map(|r| delivery_id(r.id, 0)).collect();
        let published = self.publish(requests, Some(self.args.urgent_rate)).await?;
        let missing = self.settle(&deliveries).await?;
        if missing > 0 {
            eprintln!("  {missing} urgent notifications did not settle in time");
        }
        self.timelines(&published).await
    }

    async fn backlog(&self) -> anyhow::Result<BacklogReport> {
        let args = self.args;
        let fanout = args.backlog_fanout;
        let bulk_requests = args.backlog.div_ceil(fanout);
        let requests: Vec<Outgoing> = (0..bulk_requests)
            .map(|r| {
                let recipients: Vec<String> = (0..fanout)
                    .map(|i| load::openid(&format!("b{r}x"), i))
                    .collect();
                load::request(
                    Uuid::now_v7(),
                    &recipients,
                    &format!("B-{r:06}"),
                    Priority::Bulk,
                )
            })
            .collect();
        let during_render_n = args.urgent.clamp(1, 10);
        self.inject_latency(bulk_requests * fanout + args.urgent + during_render_n)
            .await?;
        eprintln!(
            "backlog: {} bulk deliveries in {bulk_requests} requests of {fanout} …",
            bulk_requests * fanout
        );
        let start = now();
        self.publish(requests, None).await?;
        // Urgent notifications published straight after the bulk requests arrive behind them
        // on the render queue, and wait for the renderer to move those to the bulk lane.
        eprintln!("  {during_render_n} urgent while the bulk requests render …");
        let render_phase = self.urgent_batch("ur", during_render_n).await?;
        // Then wait until the whole backlog is rendered and queued on the bulk lane.
        let render_queue = self.topology.render_queue();
        let deadline = Instant::now() + Duration::from_secs(args.settle_timeout);
        loop {
            let rendered: i64 = self
                .db
                .query_one(
                    "SELECT count(*) FROM deliveries WHERE recipient LIKE 'ob%'",
                    &[],
                )
                .await?
                .get(0);
            if rendered as usize >= bulk_requests * fanout
                && self.queue_depth(&render_queue).await? == 0
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the backlog was not rendered within {} s",
                    args.settle_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let render_seconds = now() - start;
        let bulk_lane = self
            .topology
            .lane_queue(channels::WECHAT_TEMPLATE, Lane::Bulk);
        let before = self.queue_depth(&bulk_lane).await?;
        eprintln!(
            "  rendered in {render_seconds:.1} s; {before} bulk jobs queued; {} urgent through them …",
            args.urgent
        );
        let send_phase = self.urgent_batch("us", args.urgent).await?;
        let after = self.queue_depth(&bulk_lane).await?;
        Ok(BacklogReport {
            backlog: bulk_requests * fanout,
            fanout,
            bulk_requests,
            render_seconds,
            during_render: cumulative(&render_phase),
            during_send_backlog: cumulative(&send_phase),
            bulk_lane_depth_before: before,
            bulk_lane_depth_after: after,
        })
    }
}

fn stage(
    name: &'static str,
    timelines: &[Timeline],
    f: impl Fn(&Timeline) -> Option<f64>,
) -> Stage {
    let values: Vec<f64> = timelines.iter().filter_map(f).collect();
    Stage {
        name,
        latency: Percentiles::of(&values),
    }
}

/// Publish → each recorded point.
fn cumulative(timelines: &[Timeline]) -> Vec<Stage> {
    vec![
        stage("publish→accepted (confirm/202)", timelines, |t| {
            Some(t.accepted? - t.published)
        }),
        stage("publish→rendered", timelines, |t| {
            Some(t.rendered? - t.published)
        }),
        stage("publish→claimed", timelines, |t| {
            Some(t.claimed? - t.published)
        }),
        stage("publish→provider", timelines, |t| {
            Some(t.provider? - t.published)
        }),
        stage("publish→sent stored", timelines, |t| {
            Some(t.sent? - t.published)
        }),
        stage("publish→callback projected", timelines, |t| {
            Some(t.delivered? - t.published)
        }),
        stage("publish→status event", timelines, |t| {
            Some(t.status? - t.published)
        }),
    ]
}

/// The time between consecutive points, i.e. where it goes.
fn segments(timelines: &[Timeline]) -> Vec<Stage> {
    vec![
        stage(
            "accepted→rendered (render queue + renderer)",
            timelines,
            |t| Some(t.rendered? - t.accepted?),
        ),
        stage(
            "rendered→claimed (outbox relay + send queue)",
            timelines,
            |t| Some(t.claimed? - t.rendered?),
        ),
        stage("claimed→provider (token, HTTP)", timelines, |t| {
            Some(t.provider? - t.claimed?)
        }),
        stage("provider→sent stored", timelines, |t| {
            Some(t.sent? - t.provider?)
        }),
        stage("sent→callback projected", timelines, |t| {
            Some(t.delivered? - t.sent?)
        }),
        stage("projected→status event at producer", timelines, |t| {
            Some(t.status? - t.delivered?)
        }),
    ]
}
