//! Sender workers: for each delivery job, take a rate-limit slot for the provider account,
//! claim the delivery, get a token, call the provider, classify the answer, store the outcome,
//! and only then ack. Transient failures retry through the delay tiers on the channel's
//! schedule, quota answers defer without using up an attempt, jobs past their attempts or age
//! are failed and parked in the dead-letter queue. Each channel has four priority lanes
//! (queues) with their own bounded concurrency, so urgent work overtakes a bulk backlog.

pub mod breaker;
pub mod channel;
pub mod channels;
pub mod limit;
pub mod meters;
pub mod policy;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use chrono::{DateTime, Utc};
use herald_amqp::{
    AMQPValue, AmqpError, AmqpSettings, Broker, Delivery, Disposition, FieldTable, Lane, RetryTier,
};
use herald_config::{RedisSettings, TokenServiceClientSettings};
use herald_contract::v1::DeliveryJob;
use herald_contract::{decode_json, headers};
use herald_store::{Claim, Outcome, Store, StoreSettings};
use herald_telemetry::TelemetrySettings;
use herald_token::client::TokenClient;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::breaker::{Admission, BreakerSettings, Breakers};
use crate::channel::{Attempt, Channel, FailureKind};
use crate::limit::{AccountSettings, RateLimit, RateLimiter, Slot};
use crate::policy::{Next, Policy, PolicyOverride};

/// Jobs in flight at once per lane of each channel (each lane's prefetch too). The defaults
/// weight the lanes so a bulk backlog holds few slots while urgent and high work always has
/// its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LaneInFlight {
    pub urgent: u16,
    pub high: u16,
    pub normal: u16,
    pub bulk: u16,
}

impl Default for LaneInFlight {
    fn default() -> Self {
        Self {
            urgent: 8,
            high: 8,
            normal: 32,
            bulk: 8,
        }
    }
}

impl LaneInFlight {
    pub fn of(&self, lane: Lane) -> u16 {
        match lane {
            Lane::Urgent => self.urgent,
            Lane::High => self.high,
            Lane::Normal => self.normal,
            Lane::Bulk => self.bulk,
        }
        .max(1)
    }
}

/// `[sender]` in herald.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SenderSettings {
    /// Channels this worker serves (each channel can scale alone).
    pub channels: Vec<String>,
    /// Attempts before a delivery is failed and parked (deferrals do not count).
    pub max_attempts: u32,
    /// Retries stop once a delivery is this old (from its creation): `24h`.
    pub max_age: String,
    /// Tier names (from `amqp.retry_tiers`) the n-th retry waits in, the last one repeating;
    /// empty: every tier, shortest first.
    pub retry_schedule: Vec<String>,
    /// When providers' daily quotas reset (`HH:MM[:SS]±HH:MM`); WeChat: midnight in Beijing.
    pub quota_reset: String,
    /// Per-channel overrides of the five settings above, plus the channel's default rate limit.
    pub policies: BTreeMap<String, PolicyOverride>,
    /// Per provider account: its rate limit (over the channel default).
    pub accounts: BTreeMap<String, AccountSettings>,
    /// A job whose rate-limit slot is further away than this goes back through a delay tier.
    pub rate_limit_max_wait_ms: u64,
    /// Sends are spaced as if each second were this much longer, so the jitter between taking
    /// a slot and the provider receiving the call cannot push a 1-second window over a limit.
    /// Half of it absorbs a late wake-up (later than that, the job takes a new slot); the other
    /// half is left for the way from the wake-up to the provider.
    pub rate_limit_margin_ms: u64,
    /// Replicas of this worker: the local fallback limiter (Redis unreachable) allows each
    /// `limit / replicas`.
    pub replicas: u32,
    /// Redis holding the shared rate-limit state.
    pub redis: RedisSettings,
    /// Bounded concurrency (and prefetch) per lane.
    pub in_flight: LaneInFlight,
    /// On shutdown, how long jobs in flight may take before they are abandoned to the broker.
    pub drain_timeout_ms: u64,
    /// Base URL of WeChat's API (the sandbox in development).
    pub wechat_base_url: String,
    /// Base URL of WeCom's API (the sandbox in development).
    pub wecom_base_url: String,
    /// Bound on one provider call.
    pub request_timeout_ms: u64,
    /// Bound on opening a connection to the provider.
    pub connect_timeout_ms: u64,
    /// The per-account circuit breaker.
    pub breaker: BreakerSettings,
    /// DingTalk and Feishu group robots, by provider account id.
    pub robots: BTreeMap<String, channels::robots::RobotSettings>,
    /// SMTP provider accounts of the `email` channel, by provider account id.
    pub smtp: BTreeMap<String, channels::email::SmtpSettings>,
    /// Provider accounts of the `webhook` channel (secrets, allow-list), by account id.
    pub webhooks: BTreeMap<String, channels::webhook::WebhookAccountSettings>,
    /// SMS provider accounts of the `sms` channel (Tencent Cloud or Aliyun), by account id.
    pub sms: BTreeMap<String, channels::sms::SmsAccountSettings>,
}

impl Default for SenderSettings {
    fn default() -> Self {
        Self {
            channels: herald_contract::channels::ALL
                .iter()
                .map(|c| c.to_string())
                .collect(),
            max_attempts: 8,
            max_age: "24h".into(),
            retry_schedule: Vec::new(),
            quota_reset: "00:00+08:00".into(),
            policies: BTreeMap::new(),
            accounts: BTreeMap::new(),
            rate_limit_max_wait_ms: 2_000,
            rate_limit_margin_ms: 20,
            replicas: 1,
            redis: RedisSettings::default(),
            in_flight: LaneInFlight::default(),
            drain_timeout_ms: 30_000,
            wechat_base_url: "http://127.0.0.1:8099".into(),
            wecom_base_url: "http://127.0.0.1:8099".into(),
            request_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            breaker: BreakerSettings::default(),
            robots: BTreeMap::new(),
            smtp: BTreeMap::new(),
            webhooks: BTreeMap::new(),
            sms: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SenderConfig {
    pub amqp: AmqpSettings,
    pub postgres: StoreSettings,
    pub telemetry: TelemetrySettings,
    pub token_service: TokenServiceClientSettings,
    pub sender: SenderSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error("admin listener: {0}")]
    Admin(#[from] std::io::Error),
    #[error(transparent)]
    Amqp(#[from] herald_amqp::AmqpError),
    #[error(transparent)]
    Store(#[from] herald_store::StoreError),
    #[error("sender: {0}")]
    Config(String),
}

impl SenderError {
    /// Broker or database trouble, worth reconnecting for; configuration is not.
    fn is_transient(&self) -> bool {
        !matches!(self, SenderError::Config(_))
    }
}

/// What lives across reconnects: one pooled HTTP client, the limiter, the policies.
struct Shared {
    /// The channels this worker serves, by name.
    channels: BTreeMap<String, Arc<dyn Channel>>,
    limiter: RateLimiter,
    breakers: Breakers,
    policies: BTreeMap<String, Policy>,
    settings: SenderSettings,
}

struct Sender {
    broker: Broker,
    store: Store,
    shared: Arc<Shared>,
}

/// One lane's queue, as its consumer knows it.
#[derive(Debug, Clone)]
struct LaneQueue {
    queue: String,
    channel: String,
    /// Where retries of this lane go back to (the `CC` of a retry).
    routing_key: String,
}

/// Runs sender workers for the configured channels until `shutdown`. A lost broker connection
/// is ridden out by the consumers (they subscribe again on a new one); anything else that ends
/// a lane (the database's relay, a deleted queue) restarts the workers with a backoff
/// instead of ending the process; only configuration errors, or
/// failures before broker, database and listener were first reached, end it.
pub async fn run(config: SenderConfig, shutdown: CancellationToken) -> Result<(), SenderError> {
    let settings = &config.sender;
    if settings.channels.is_empty() {
        return Err(SenderError::Config(
            "sender.channels: none configured".into(),
        ));
    }
    let topology = herald_amqp::Topology::new(&config.amqp).map_err(SenderError::Config)?;
    let policies = policy::resolve(
        &settings.channels,
        &policy::Defaults {
            retry_schedule: &settings.retry_schedule,
            max_attempts: settings.max_attempts,
            max_age: &settings.max_age,
            quota_reset: &settings.quota_reset,
            // A channel's default limit comes from its `[sender.policies]` entry.
            rate_limit: None,
        },
        &settings.policies,
        &topology,
    )
    .map_err(SenderError::Config)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(settings.request_timeout_ms))
        .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .map_err(|e| SenderError::Config(e.to_string()))?;
    let channel_shared = channels::Shared {
        http,
        tokens: Arc::new(TokenClient::new(&config.token_service)),
    };
    let served = settings
        .channels
        .iter()
        .map(|name| channels::build(name, settings, &channel_shared).map(|c| (name.clone(), c)))
        .collect::<Result<BTreeMap<_, _>, _>>()
        .map_err(SenderError::Config)?;
    meters::describe();
    let shared = Arc::new(Shared {
        channels: served,
        limiter: RateLimiter::new(
            &settings.redis,
            settings.replicas,
            Duration::from_millis(settings.rate_limit_max_wait_ms),
            Duration::from_millis(settings.rate_limit_margin_ms),
        ),
        breakers: Breakers::new(settings.breaker),
        policies,
        settings: settings.clone(),
    });

    // Reconnects are cheap and a broker restart takes 10-20 s: pauses of at most 5 s keep the
    // time from the broker's return to the workers' small (the fault suite kills it three
    // times a minute apart).
    let reconnect_backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .with_jitter()
            .build()
    };
    let mut backoff = reconnect_backoff();
    let mut started = false;
    loop {
        let began = tokio::time::Instant::now();
        let result = run_once(&config, shared.clone(), &shutdown, &mut started).await;
        match result {
            Ok(()) => return Ok(()),
            Err(error) if !started || shutdown.is_cancelled() || !error.is_transient() => {
                return Err(error);
            }
            Err(error) => {
                if began.elapsed() > Duration::from_secs(60) {
                    // It ran well for a while: start the backoff over.
                    backoff = reconnect_backoff();
                }
                let pause = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::error!(%error, ?pause, "sender workers stopped; restarting them");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// One life of the workers: connect, consume every lane of every channel, until shutdown or
/// until a consumer ends.
async fn run_once(
    config: &SenderConfig,
    shared: Arc<Shared>,
    shutdown: &CancellationToken,
    started: &mut bool,
) -> Result<(), SenderError> {
    let settings = &shared.settings;
    let broker = Broker::connect(&config.amqp, "sender").await?;
    broker.declare_topology().await?;
    // Stops every worker and the relay when one lane's consuming ends for any reason.
    let stop = shutdown.child_token();
    let (store, relay) = match Store::open(&config.postgres, &broker, stop.clone()).await {
        Ok(opened) => opened,
        Err(error) => {
            broker.close().await;
            return Err(error.into());
        }
    };
    // `/metrics`, `/healthz`, `/readyz` when `telemetry.admin_listen` is set; it stops with
    // this life of the workers and is bound again by the next.
    if let Err(error) = herald_telemetry::spawn_admin(
        &config.telemetry,
        ready_check(&store, &broker, &shared),
        stop.clone(),
    )
    .await
    {
        stop.cancel();
        let _ = relay.await;
        broker.close().await;
        return Err(error.into());
    }
    // Broker, database and listener were all reachable once: from here on a failure (a
    // connection lost while the lanes start, say) is something to reconnect from.
    *started = true;
    let sender = Arc::new(Sender {
        broker: broker.clone(),
        store,
        shared: shared.clone(),
    });
    let drain = Duration::from_millis(settings.drain_timeout_ms);
    let mut workers: tokio::task::JoinSet<Result<(), AmqpError>> = tokio::task::JoinSet::new();
    let mut failed = None;
    'lanes: for channel in &settings.channels {
        for lane in Lane::ALL {
            let topology = broker.topology();
            let lane_queue = LaneQueue {
                queue: topology.lane_queue(channel, lane),
                channel: channel.clone(),
                routing_key: topology.lane_routing_key(channel, lane),
            };
            let in_flight = settings.in_flight.of(lane);
            let tag = format!("herald-sender-{channel}-{}", lane.name());
            let subscribed = tokio::select! {
                subscribed = broker.consume_with_prefetch(&lane_queue.queue, &tag, in_flight) => {
                    subscribed.map_err(SenderError::from)
                }
                // A lane already running ended (its queue was deleted, say): start over.
                Some(ended) = workers.join_next() => {
                    if shutdown.is_cancelled() {
                        break 'lanes;
                    }
                    Err(match ended {
                        Ok(Err(error)) => error.into(),
                        _ => AmqpError::Cancelled(lane_queue.queue.clone()).into(),
                    })
                }
            };
            let consumer = match subscribed {
                Ok(consumer) => consumer.with_drain_timeout(drain),
                Err(error) => {
                    failed = Some(error);
                    break 'lanes;
                }
            };
            tracing::info!(queue = %lane_queue.queue, in_flight, "sender consuming");
            let sender = sender.clone();
            let (broker, stop) = (broker.clone(), stop.clone());
            let lane_queue = Arc::new(lane_queue);
            workers.spawn(
                consumer.run(broker, usize::from(in_flight), stop, move |delivery| {
                    let (sender, lane_queue) = (sender.clone(), lane_queue.clone());
                    async move { sender.handle(&lane_queue, delivery).await }
                }),
            );
        }
    }
    let mut ended = match failed {
        Some(error) => {
            stop.cancel();
            Err(error)
        }
        None => Ok(()),
    };
    while let Some(worker) = workers.join_next().await {
        stop.cancel();
        if let Ok(Err(error)) = worker
            && ended.is_ok()
            && !shutdown.is_cancelled()
        {
            ended = Err(error.into());
        }
    }
    stop.cancel();
    let _ = relay.await;
    // Closing the connection hands any job abandoned at the drain timeout back to the broker.
    broker.close().await;
    ended
}

/// The store's check (Postgres, RabbitMQ), plus open circuit breakers as notes: a provider
/// being down is no reason to take the worker out of service.
fn ready_check(
    store: &Store,
    broker: &Broker,
    shared: &Arc<Shared>,
) -> herald_telemetry::ReadyCheck {
    let dependencies = store.ready_check(broker);
    let shared = shared.clone();
    Arc::new(move || {
        let (dependencies, shared) = (dependencies.clone(), shared.clone());
        Box::pin(async move {
            let mut notes = dependencies().await?;
            let open = shared.breakers.open_accounts();
            if !open.is_empty() {
                notes.push(format!("circuit breaker open for {}", open.join(", ")));
            }
            Ok(notes)
        })
    })
}

/// Why a delivery gave up for its next channel before its own retries ran out.
const FALLBACK_DEADLINE: &str = "not sent within the channel's fallback_after";

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl Sender {
    async fn handle(&self, lane: &LaneQueue, delivery: Arc<Delivery>) -> Disposition {
        let span = herald_amqp::trace::consumer_span(&lane.queue, &delivery);
        self.process(lane, &delivery).instrument(span).await
    }

    async fn process(&self, lane: &LaneQueue, delivery: &Delivery) -> Disposition {
        let job: DeliveryJob = match decode_json(&delivery.data) {
            Ok(job) => job,
            Err(e) => return dead("decode_error", e.to_string()),
        };
        let Ok(delivery_id) = Uuid::parse_str(&job.delivery_id) else {
            return dead("decode_error", "delivery_id: must be a UUID".into());
        };
        let span = tracing::Span::current();
        span.record("herald.delivery_id", tracing::field::display(delivery_id));
        span.record("herald.tenant", job.tenant.as_str());
        span.record("herald.channel", job.channel.as_str());
        let (Some(policy), Some(channel)) = (
            self.shared.policies.get(&lane.channel),
            self.shared.channels.get(&lane.channel),
        ) else {
            return dead(
                "rejected",
                format!("channel `{}` is not served here", lane.channel),
            );
        };
        let table = delivery.properties.headers().as_ref();
        // Attempts counted against the policy: retries count, deferrals and reschedules do not.
        let attempt = herald_amqp::header_u32(table, headers::ATTEMPT)
            .unwrap_or(1)
            .max(1);

        // Past its expires_at: never sent. Stored as `expired` (a delivery already settled
        // stays as it is), then acked; checked before any slot, claim or provider call.
        if let Some(expires_at) = job.expires_at.as_ref()
            && let Some(at) = DateTime::from_timestamp(
                expires_at.seconds,
                u32::try_from(expires_at.nanos).unwrap_or(0),
            )
            && at <= Utc::now()
        {
            let message = format!("not sent by expires_at {}", at.to_rfc3339());
            return match self.store.expire_delivery(delivery_id, &message).await {
                Ok(state) => {
                    tracing::info!(state = state.name(), "delivery expired before sending");
                    Disposition::Ack
                }
                Err(herald_store::StoreError::NotFound(what)) => dead("unknown_delivery", what),
                Err(e) => Disposition::Requeue {
                    error: e.to_string(),
                },
            };
        }

        // A deferred job that came back before its time waits again, untouched.
        if let Some(until) = herald_amqp::header_i64(table, headers::DEFER_UNTIL)
            && until > now_ms()
        {
            let left = Duration::from_millis(u64::try_from(until - now_ms()).unwrap_or(0));
            let tier = self.broker.topology().tier_at_most(left).clone();
            return self.republish(delivery, lane, &tier, |_| {}).await;
        }

        // An account whose provider keeps failing is left alone: the job waits in a tier
        // without a call and without using an attempt.
        let account = job.provider_account.as_str();
        if let Admission::Wait(wait) = self.shared.breakers.admit(account) {
            meters::breaker_deferred(&lane.channel, account);
            let tier = self.broker.topology().tier_for(wait).clone();
            return self.republish(delivery, lane, &tier, |_| {}).await;
        }

        // Slots under the provider's narrower limits (a WeCom member, an e-mail domain) and the
        // account's own, before anything is claimed: the send goes at the latest of them. The
        // narrower go first, being the likelier to be far away (a slot left unused when a later
        // one is too far only ever sends less).
        let asked = tokio::time::Instant::now();
        let limit = self.rate_limit(account, policy, channel.as_ref());
        let mut send_at = asked;
        for narrower in channel.narrower_limits(&job) {
            let slot = self
                .shared
                .limiter
                .reserve_narrower(account, &narrower)
                .await;
            match slot {
                Slot::At(at) => send_at = send_at.max(at),
                Slot::Later(wait) => {
                    return self
                        .reschedule_for_limit(delivery, lane, account, narrower.scope, wait)
                        .await;
                }
            }
        }
        if let Some(limit) = limit {
            match self.shared.limiter.reserve(account, limit).await {
                Slot::At(at) => send_at = send_at.max(at),
                Slot::Later(wait) => {
                    return self
                        .reschedule_for_limit(delivery, lane, account, "account", wait)
                        .await;
                }
            }
        }

        match self.store.claim_delivery(delivery_id).await {
            Ok(Claim::Claimed { attempt: calls }) => {
                span.record("herald.attempt", calls);
            }
            Ok(Claim::Finished(state)) => {
                tracing::info!(
                    state = state.name(),
                    "delivery already settled; not sending again"
                );
                return Disposition::Ack;
            }
            Ok(Claim::Missing) => {
                return dead("unknown_delivery", format!("no delivery {delivery_id}"));
            }
            Err(e) => {
                return Disposition::Requeue {
                    error: e.to_string(),
                };
            }
        }
        // The claim happened while waiting for the slot; now wait out the rest. A job that
        // reaches its slot late (a slow claim, a busy runtime) takes a new one rather than
        // crowding the sends after it.
        if let Some(limit) = limit {
            self.wait_for_slot(&lane.channel, account, limit, send_at)
                .await;
            meters::rate_limit_wait(account, asked.elapsed());
        } else if send_at > tokio::time::Instant::now() {
            tokio::time::sleep_until(send_at).await;
            meters::rate_limited(&lane.channel, account, "waited");
            meters::rate_limit_wait(account, asked.elapsed());
        }

        let outcome = channel.send(&job, delivery_id).await;
        // Any answer shows the provider is up; failing to reach it (or it saying it is busy)
        // counts toward its breaker. A token-service failure says nothing about it.
        match &outcome {
            Attempt::Retry {
                provider_down: true,
                ..
            } => self.shared.breakers.failed(channel.provider(), account),
            Attempt::Retry { .. } => {}
            Attempt::Failed { code, .. } if code == "token" => {}
            _ => self.shared.breakers.succeeded(channel.provider(), account),
        }
        match outcome {
            Attempt::Sent(msgid) => {
                meters::outcome(&lane.channel, "sent", "0");
                self.store_then_ack(
                    delivery_id,
                    Outcome::Sent {
                        provider_msgid: msgid,
                    },
                )
                .await
            }
            Attempt::Failed {
                code,
                message,
                kind,
                alert,
            } => {
                if let Some(alert) = alert {
                    meters::alert(&lane.channel, account, alert.label());
                    tracing::error!(%code, %message, ?kind, account, "delivery failed: configuration needs fixing");
                } else {
                    tracing::warn!(%code, %message, ?kind, "delivery failed permanently");
                }
                meters::outcome(&lane.channel, "failed", &code);
                // A recipient this channel cannot reach may be reachable on the next one.
                let fallback = (kind == FailureKind::Recipient)
                    .then(|| self.fallback(&job))
                    .flatten();
                self.store_then_ack(
                    delivery_id,
                    Outcome::Failed {
                        code,
                        message,
                        fallback,
                    },
                )
                .await
            }
            Attempt::Retry { code, message, .. } => {
                let created_at = match self.created_at(delivery_id).await {
                    Ok(at) => at,
                    Err(disposition) => return disposition,
                };
                match policy.after_failure(attempt, created_at, Utc::now()) {
                    Next::GiveUp(reason) => {
                        self.give_up(lane, &job, delivery_id, code, &reason, &message)
                            .await
                    }
                    Next::Retry(tier)
                        if !job.fallback.is_empty()
                            && policy
                                .past_fallback_deadline(created_at, Utc::now() + tier.delay) =>
                    {
                        self.give_up(lane, &job, delivery_id, code, FALLBACK_DEADLINE, &message)
                            .await
                    }
                    Next::Retry(tier) => {
                        let outcome = Outcome::Retrying {
                            code: code.clone(),
                            message,
                            retry_in: tier.name.clone(),
                        };
                        if let Err(e) = self.store.record_outcome(delivery_id, &outcome).await {
                            return Disposition::Requeue {
                                error: e.to_string(),
                            };
                        }
                        meters::outcome(&lane.channel, "retrying", &code);
                        meters::retry(&lane.channel, &tier.name);
                        self.republish(delivery, lane, &tier, |table| {
                            table.insert(
                                headers::ATTEMPT.into(),
                                AMQPValue::LongLongInt(i64::from(attempt) + 1),
                            );
                        })
                        .await
                    }
                }
            }
            Attempt::Defer {
                code,
                message,
                defer,
                alert,
            } => {
                if let Some(alert) = alert {
                    meters::alert(&lane.channel, account, alert.label());
                    tracing::error!(%code, %message, account, "provider quota or block: deferring");
                }
                let created_at = match self.created_at(delivery_id).await {
                    Ok(at) => at,
                    Err(disposition) => return disposition,
                };
                let until = match policy.defer_until(defer, created_at, Utc::now()) {
                    Ok(until) => until,
                    Err(reason) => {
                        return self
                            .give_up(lane, &job, delivery_id, code, &reason, &message)
                            .await;
                    }
                };
                if !job.fallback.is_empty() && policy.past_fallback_deadline(created_at, until) {
                    return self
                        .give_up(lane, &job, delivery_id, code, FALLBACK_DEADLINE, &message)
                        .await;
                }
                if let Err(e) = self
                    .store
                    .record_deferral(delivery_id, &code, &message, until)
                    .await
                {
                    return Disposition::Requeue {
                        error: e.to_string(),
                    };
                }
                meters::outcome(&lane.channel, "deferred", &code);
                let left = (until - Utc::now()).to_std().unwrap_or_default();
                let tier = self.broker.topology().tier_at_most(left).clone();
                self.republish(delivery, lane, &tier, |table| {
                    table.insert(
                        headers::DEFER_UNTIL.into(),
                        AMQPValue::LongLongInt(until.timestamp_millis()),
                    );
                })
                .await
            }
        }
    }

    /// A job whose slot under a limit (`scope`: the account's or a narrower one) is too far
    /// away goes back through a delay tier, unchanged.
    async fn reschedule_for_limit(
        &self,
        delivery: &Delivery,
        lane: &LaneQueue,
        account: &str,
        scope: &str,
        wait: Duration,
    ) -> Disposition {
        meters::rate_limited(&lane.channel, account, "rescheduled");
        tracing::debug!(?wait, scope, "rate limit slot too far away; rescheduling");
        let tier = self.broker.topology().tier_for(wait).clone();
        self.republish(delivery, lane, &tier, |_| {}).await
    }

    /// Sleeps until `slot`; if the wake-up comes later than half the margin, the slot is given
    /// up and a new one taken (waiting however long that takes: the job is claimed). The other
    /// half of the margin covers the time from here to the provider receiving the call.
    async fn wait_for_slot(
        &self,
        channel: &str,
        account: &str,
        limit: RateLimit,
        mut slot: tokio::time::Instant,
    ) {
        let late_after = Duration::from_millis(self.shared.settings.rate_limit_margin_ms) / 2;
        let mut waited = false;
        loop {
            if slot > tokio::time::Instant::now() {
                waited = true;
                tokio::time::sleep_until(slot).await;
            }
            if tokio::time::Instant::now().saturating_duration_since(slot) <= late_after {
                break;
            }
            meters::rate_limited(channel, account, "late");
            slot = loop {
                match self.shared.limiter.reserve(account, limit).await {
                    Slot::At(at) => break at,
                    Slot::Later(wait) => {
                        tokio::time::sleep(wait.saturating_sub(self.shared.limiter.max_wait()))
                            .await;
                    }
                }
            };
        }
        if waited {
            meters::rate_limited(channel, account, "waited");
        }
    }

    /// The account's rate limit: its own, else its channel's configured default, else the
    /// provider's documented one.
    fn rate_limit(
        &self,
        account: &str,
        policy: &Policy,
        channel: &dyn Channel,
    ) -> Option<RateLimit> {
        self.shared
            .settings
            .accounts
            .get(account)
            .and_then(|a| a.rate_limit)
            .or(policy.rate_limit)
            .or_else(|| channel.default_rate_limit())
    }

    async fn created_at(&self, delivery_id: Uuid) -> Result<DateTime<Utc>, Disposition> {
        match self.store.delivery_created_at(delivery_id).await {
            Ok(Some(at)) => Ok(at),
            Ok(None) => Err(dead(
                "unknown_delivery",
                format!("no delivery {delivery_id}"),
            )),
            Err(e) => Err(Disposition::Requeue {
                error: e.to_string(),
            }),
        }
    }

    /// Fails the delivery for good (`exhausted`): its fallback channel takes over when it has
    /// one; otherwise the job is parked in the dead-letter queue for an operator.
    async fn give_up(
        &self,
        lane: &LaneQueue,
        job: &DeliveryJob,
        delivery_id: Uuid,
        code: String,
        reason: &str,
        last: &str,
    ) -> Disposition {
        let message = format!("{reason}; last: {last}");
        let fallback = self.fallback(job);
        let falls_back = fallback.is_some();
        if let Err(e) = self
            .store
            .record_outcome(
                delivery_id,
                &Outcome::Failed {
                    code: code.clone(),
                    message: message.clone(),
                    fallback,
                },
            )
            .await
        {
            return Disposition::Requeue {
                error: e.to_string(),
            };
        }
        meters::outcome(&lane.channel, "exhausted", &code);
        if falls_back {
            // Replaying this job later would send on a channel already given up on while
            // the fallback has gone out: nothing to park.
            Disposition::Ack
        } else {
            dead("exhausted", message)
        }
    }

    /// The next step of `job`'s fallback chain as a delivery and its job, carrying the rest.
    fn fallback(&self, job: &DeliveryJob) -> Option<Box<herald_store::Fallback>> {
        let next = job.fallback_job()?;
        let id = Uuid::parse_str(&next.delivery_id).ok()?;
        tracing::info!(
            from = %job.channel,
            to = %next.channel,
            "recipient unreachable here: falling back to the next channel"
        );
        Some(Box::new(herald_store::Fallback {
            delivery: herald_store::NewDelivery {
                id,
                channel: next.channel.clone(),
                provider_account: next.provider_account.clone(),
                recipient: next.recipient.clone(),
            },
            job: herald_store::OutboxJob::delivery(self.broker.topology(), &next),
        }))
    }

    /// Parks the job in `tier`; it comes back to this lane's queue (`CC` = the lane's routing
    /// key). `edit` adjusts the headers; a stale deferral mark is dropped.
    async fn republish(
        &self,
        delivery: &Delivery,
        lane: &LaneQueue,
        tier: &RetryTier,
        edit: impl FnOnce(&mut FieldTable),
    ) -> Disposition {
        let now = now_ms();
        let mut table =
            herald_amqp::headers_without(delivery.properties.headers().as_ref(), |name| {
                name == "CC"
                    || (name == headers::DEFER_UNTIL
                        && herald_amqp::header_i64(delivery.properties.headers().as_ref(), name)
                            .is_none_or(|until| until <= now))
            });
        edit(&mut table);
        herald_amqp::trace::inject_current(&mut table);
        let properties = herald_amqp::republishable(&delivery.properties).with_headers(table);
        match self
            .broker
            .publisher()
            .publish_retry(
                self.broker.topology(),
                tier,
                &lane.routing_key,
                &delivery.data,
                properties,
            )
            .await
        {
            Ok(()) => Disposition::Ack,
            Err(e) => Disposition::Requeue {
                error: e.to_string(),
            },
        }
    }

    async fn store_then_ack(&self, delivery_id: Uuid, outcome: Outcome) -> Disposition {
        match self.store.record_outcome(delivery_id, &outcome).await {
            Ok(_) => Disposition::Ack,
            Err(e) => Disposition::Requeue {
                error: e.to_string(),
            },
        }
    }
}

fn dead(reason: &'static str, detail: String) -> Disposition {
    Disposition::DeadLetter { reason, detail }
}
