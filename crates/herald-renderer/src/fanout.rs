//! Fan-out: one request to up to [`schedule::MAX_RECIPIENTS`] recipients, in batches. Each
//! batch resolves its recipients, renders them, decides each delivery (send, hold back,
//! suppress) and writes deliveries, history, status events and jobs in one transaction
//! (the jobs through the outbox). The message's fan-out cursor moves in the same
//! transaction, so a redelivered request resumes after the last whole batch, and delivery
//! ids are derived from the message id and recipient index, so nothing is created twice.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use herald_contract::channels;
use herald_contract::v1::{DeliveryJob, NotificationRequest, Priority, Recipient};
use herald_store::{
    BatchWritten, Decision, MessageRecord, NewDelivery, OutboxJob, PlannedDelivery, Preferences,
    RecipientProfile,
};
use uuid::Uuid;

use crate::audience::{self, Target, WechatAccount};
use crate::preferences::{Candidate, Verdict, quiet_until, timezone_of};
use crate::schedule::time_of;
use crate::{Failure, RenderError, Renderer, address_for};

/// What every batch of one message shares.
struct Context<'a> {
    record: &'a MessageRecord,
    request: &'a NotificationRequest,
    now: DateTime<Utc>,
    send_at: Option<DateTime<Utc>>,
    urgent: bool,
    category: String,
    template: String,
    tenant_preferences: Preferences,
    wanted: Vec<String>,
}

pub(crate) fn rejected(
    message_id: Uuid,
    field: impl Into<String>,
    message: impl Into<String>,
) -> Failure {
    Failure::Rejected {
        message_id,
        error: RenderError::new(field, message),
    }
}

impl Renderer {
    /// Writes the deliveries of a stored message (see the module docs).
    pub(crate) async fn fan_out(
        &self,
        record: &MessageRecord,
        request: &NotificationRequest,
    ) -> Result<(), Failure> {
        let id = record.id;
        let tenant = record.tenant_id.as_str();
        let progress = self.store.fanout_progress(id).await?;
        if progress.cancelled {
            tracing::info!("message cancelled; nothing more to render");
            return Ok(());
        }
        let total = request.recipients.len();
        if total > self.settings.max_recipients {
            return Err(rejected(
                id,
                "recipients",
                format!(
                    "at most {} recipients per request (got {total})",
                    self.settings.max_recipients
                ),
            ));
        }
        let now = self.settings.now();
        // Expired before anything was written: nothing to render. (Once a batch is written,
        // the rest goes out and the senders expire what is late.)
        if progress.done == 0
            && let Some(expires_at) = time_of(request.expires_at.as_ref())
            && expires_at <= now
        {
            let error = format!(
                "expired at {} before it was rendered",
                expires_at.to_rfc3339()
            );
            self.store.expire_message(id, &error).await?;
            tracing::info!(%error, "message expired");
            return Ok(());
        }
        // The template (cached; plan() names any problem with it) gives the category that
        // preferences are keyed on, and the channels when the request names none.
        let compiled = match request.template.as_ref() {
            Some(t) => {
                let version = (t.version > 0).then(|| i32::try_from(t.version).unwrap_or(i32::MAX));
                self.templates
                    .get(&self.store, tenant, &t.id, version)
                    .await?
                    .ok()
            }
            None => None,
        };
        let category = compiled
            .as_ref()
            .map(|t| t.definition.category.clone())
            .unwrap_or_default();
        let wanted: Vec<String> = match (&compiled, request.channels.is_empty()) {
            (_, false) => request.channels.clone(),
            (Some(t), true) => t
                .definition
                .channel_names()
                .into_iter()
                .map(String::from)
                .collect(),
            (None, true) => channels::ALL.iter().map(|c| c.to_string()).collect(),
        };
        let reachable = |r: &Recipient| {
            wanted
                .iter()
                .any(|channel| address_for(r, channel).is_some())
        };
        // Direct addresses are checked before anything is written, so a bad recipient near
        // the end does not reject a half-written message.
        if let Some(index) = request
            .recipients
            .iter()
            .position(|r| r.user_id.is_empty() && !reachable(r))
        {
            return Err(rejected(
                id,
                format!("recipients[{index}]"),
                format!("no address for any of the channels [{}]", wanted.join(", ")),
            ));
        }
        let template = request
            .template
            .as_ref()
            .map(|t| t.id.clone())
            .unwrap_or_default();
        // Read defensively from the stored definition: an optional string.
        let context = Context {
            record,
            request,
            now,
            send_at: time_of(request.send_at.as_ref()).filter(|t| *t > now),
            urgent: request.priority() == Priority::Urgent,
            category,
            template,
            tenant_preferences: self.store.tenant_preferences(tenant).await?,
            wanted,
        };
        let with_openid = Recipient {
            wechat_openid: "-".into(),
            ..Default::default()
        };
        let wechat = WechatAccount::of(&self.store, tenant, &context.wanted, |channel| {
            address_for(&with_openid, channel).is_some()
        })
        .await?;
        let batch = self.settings.fanout_batch.max(1);
        let mut created = 0;
        let mut start = progress.done.min(total);
        while start < total {
            let end = (start + batch).min(total);
            // The semaphore is never closed, so the permits always come.
            let _rendering = self
                .recipients_in_flight
                .acquire_many(u32::try_from(end - start).unwrap_or(u32::MAX))
                .await
                .ok();
            let targets = audience::resolve(
                &self.store,
                tenant,
                &request.recipients[start..end],
                start,
                &wechat,
                |r| context.wanted.iter().any(|c| address_for(r, c).is_some()),
            )
            .await?;
            let planned = self.decide_batch(&context, targets).await?;
            match self
                .store
                .write_fanout_batch(id, tenant, end, &planned)
                .await?
            {
                BatchWritten::Cancelled => {
                    tracing::info!(written = start, "message cancelled mid-fan-out");
                    return Ok(());
                }
                BatchWritten::Written { created: n } => created += n,
            }
            start = end;
        }
        tracing::info!(recipients = total, created, "rendered");
        Ok(())
    }

    /// Renders one batch and decides what becomes of each delivery.
    async fn decide_batch(
        &self,
        context: &Context<'_>,
        targets: Vec<Target>,
    ) -> Result<Vec<PlannedDelivery>, Failure> {
        let id = context.record.id;
        let tenant = context.record.tenant_id.as_str();
        let mut planned = Vec::with_capacity(targets.len());
        let mut reachable: Vec<(usize, Recipient, Option<Box<RecipientProfile>>)> = Vec::new();
        for target in targets {
            match target {
                Target::Reachable {
                    index,
                    recipient,
                    profile,
                } => reachable.push((index, recipient, profile)),
                Target::Unreachable {
                    index,
                    user_id,
                    reason,
                    detail,
                } => {
                    let channel = context.wanted.first().cloned().unwrap_or_default();
                    planned.push(PlannedDelivery {
                        delivery: NewDelivery {
                            id: Uuid::new_v5(&id, format!("{index}/{channel}").as_bytes()),
                            channel,
                            provider_account: String::new(),
                            recipient: format!("user:{user_id}"),
                        },
                        decision: Decision::Suppress {
                            reason: reason.to_string(),
                            detail,
                        },
                    });
                }
            }
        }
        if reachable.is_empty() {
            return Ok(planned);
        }
        let batch: Vec<(usize, &Recipient)> = reachable.iter().map(|(i, r, _)| (*i, r)).collect();
        let rendered = self
            .plan(tenant, id, context.request, &batch)
            .await?
            .map_err(|error| Failure::Rejected {
                message_id: id,
                error,
            })?;
        let unfollowed = self.unfollowed(&rendered).await?;
        // plan() renders one delivery per recipient, in order.
        for ((row, job), (_, recipient, profile)) in rendered.into_iter().zip(&reachable) {
            let (row, job) =
                if unfollowed.contains(&(row.provider_account.clone(), row.recipient.clone())) {
                    planned.push(PlannedDelivery {
                        delivery: row,
                        decision: Decision::Suppress {
                            reason: "unsubscribed".into(),
                            detail: "the recipient has unfollowed the Official Account".into(),
                        },
                    });
                    // Their next channel, if the request gave one, takes over.
                    let Some(next) = job.fallback_job() else {
                        continue;
                    };
                    let Ok(id) = Uuid::parse_str(&next.delivery_id) else {
                        continue;
                    };
                    let row = NewDelivery {
                        id,
                        channel: next.channel.clone(),
                        provider_account: next.provider_account.clone(),
                        recipient: next.recipient.clone(),
                    };
                    (row, next)
                } else {
                    (row, job)
                };
            let decision = self
                .decide(context, &row, &job, recipient, profile.as_deref())
                .await?;
            planned.push(PlannedDelivery {
                delivery: row,
                decision,
            });
        }
        Ok(planned)
    }

    /// Preferences, then holding back (send_at, quiet hours), else send.
    async fn decide(
        &self,
        context: &Context<'_>,
        row: &NewDelivery,
        job: &DeliveryJob,
        recipient: &Recipient,
        profile: Option<&RecipientProfile>,
    ) -> Result<Decision, Failure> {
        let preferences = match profile {
            Some(p) => p.preferences.over(&context.tenant_preferences),
            None => context.tenant_preferences.clone(),
        };
        let payload = serde_json::to_value(&job.payload).unwrap_or_default();
        let delivery_id = row.id.to_string();
        let verdict = self
            .limits
            .check(
                &preferences,
                &Candidate {
                    tenant: &context.record.tenant_id,
                    delivery_id: &delivery_id,
                    user_id: Some(recipient.user_id.as_str()).filter(|u| !u.is_empty()),
                    channel: &row.channel,
                    address: &row.recipient,
                    template: &context.template,
                    category: &context.category,
                    payload: &payload,
                },
            )
            .await
            .map_err(|e| Failure::Transient(format!("redis: {e}")))?;
        if let Verdict::Suppress { reason, detail } = verdict {
            tracing::debug!(
                recipient = %herald_store::mask(&row.recipient),
                reason,
                "delivery suppressed"
            );
            return Ok(Decision::Suppress {
                reason: reason.into(),
                detail,
            });
        }
        let job_message = self.job_message(job);
        let from = context.send_at.unwrap_or(context.now);
        let quiet = match (&preferences.quiet_hours, context.urgent) {
            (Some(quiet), false) => {
                let timezone =
                    timezone_of(profile.and_then(|p| p.timezone.as_deref()), &preferences);
                quiet_until(from, timezone, quiet).map(|until| (until, timezone))
            }
            _ => None,
        };
        Ok(match (quiet, context.send_at) {
            (Some((until, timezone)), _) => Decision::Defer {
                job: job_message,
                until,
                reason: "quiet_hours".into(),
                detail: format!("quiet hours in {timezone} until {}", until.to_rfc3339()),
            },
            (None, Some(send_at)) => Decision::Defer {
                job: job_message,
                until: send_at,
                reason: "scheduled".into(),
                detail: format!("send_at {}", send_at.to_rfc3339()),
            },
            (None, None) => Decision::Send(job_message),
        })
    }

    /// The recipients of `rendered` known to have unfollowed the sending account
    /// (`wechat.template` only: follow state comes from the account's callbacks).
    async fn unfollowed(
        &self,
        rendered: &[(NewDelivery, DeliveryJob)],
    ) -> Result<HashSet<(String, String)>, Failure> {
        let mut by_account: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (row, _) in rendered {
            if row.channel == channels::WECHAT_TEMPLATE {
                by_account
                    .entry(row.provider_account.as_str())
                    .or_default()
                    .push(row.recipient.clone());
            }
        }
        let mut unfollowed = HashSet::new();
        for (account, recipients) in by_account {
            for recipient in self
                .store
                .unfollowed_recipients(account, &recipients)
                .await?
            {
                unfollowed.insert((account.to_string(), recipient));
            }
        }
        Ok(unfollowed)
    }

    /// The delivery job as an outbox row.
    fn job_message(&self, job: &DeliveryJob) -> OutboxJob {
        OutboxJob::delivery(self.broker.topology(), job)
    }
}
