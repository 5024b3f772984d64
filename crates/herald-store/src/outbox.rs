//! The transactional outbox and its relay.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_amqp::{Publisher, Routing};
use tokio_util::sync::CancellationToken;

use crate::{Store, StoreError};

/// A broker message written in the same transaction as the state change it announces.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    pub exchange: String,
    pub routing_key: String,
    /// String headers (trace context, schema version).
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// Whether a queue must take it (requests) or not (status announcements).
    pub routing: Routing,
}

/// A delivery job to publish through the outbox: a message plus the AMQP properties a sender
/// and the dead-letter tools read (`message_id` = the delivery id, `priority`).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxJob {
    pub message: OutboxMessage,
    pub message_id: String,
    pub priority: u8,
}

impl OutboxJob {
    /// A delivery job as an outbox row: its lane's routing key on the deliveries exchange, the
    /// current trace context, the schema version, the attempt (1), and the delivery id as the
    /// AMQP message id.
    pub fn delivery(
        topology: &herald_amqp::Topology,
        job: &herald_contract::v1::DeliveryJob,
    ) -> Self {
        use herald_contract::{SCHEMA_VERSION, headers};
        let mut job_headers: std::collections::BTreeMap<String, String> =
            herald_telemetry::trace_headers().into_iter().collect();
        job_headers.insert(headers::SCHEMA_VERSION.into(), SCHEMA_VERSION.into());
        job_headers.insert(headers::ATTEMPT.into(), "1".into());
        OutboxJob {
            message: OutboxMessage {
                exchange: topology.deliveries_exchange(),
                // Each priority has its own lane (queue): `<channel>` for normal,
                // `<channel>.<lane>` for urgent, high and bulk.
                routing_key: topology
                    .lane_routing_key(&job.channel, herald_amqp::Lane::from(job.priority())),
                headers: job_headers,
                body: herald_contract::encode_json(job),
                routing: Routing::Required,
            },
            message_id: job.delivery_id.clone(),
            priority: job.priority().amqp_priority(),
        }
    }
}

/// Rows the relay takes per round.
const BATCH: i64 = 500;
/// Rows written by another process (or left by a crash) are found by this poll.
const POLL: Duration = Duration::from_secs(1);

impl Store {
    pub(crate) async fn insert_outbox(
        tx: &deadpool_postgres::Transaction<'_>,
        message: &OutboxMessage,
    ) -> Result<(), StoreError> {
        let headers = serde_json::to_value(&message.headers).unwrap_or_default();
        let statement = tx
            .prepare_cached(
                "INSERT INTO outbox (exchange, routing_key, headers, body, mandatory)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await?;
        tx.execute(
            &statement,
            &[
                &message.exchange,
                &message.routing_key,
                &headers,
                &message.body,
                &(message.routing == Routing::Required),
            ],
        )
        .await?;
        Ok(())
    }

    /// Inserts many outbox rows with one statement (fan-out writes thousands per message).
    pub(crate) async fn insert_outbox_many(
        tx: &deadpool_postgres::Transaction<'_>,
        messages: &[OutboxMessage],
        jobs: &[OutboxJob],
    ) -> Result<(), StoreError> {
        if messages.is_empty() && jobs.is_empty() {
            return Ok(());
        }
        // Jobs first: rows are relayed in id order, so a producer that sees a delivery's
        // `queued` event normally finds its job already in the queue.
        let all = jobs
            .iter()
            .map(|j| {
                (
                    &j.message,
                    Some(j.message_id.clone()),
                    Some(i16::from(j.priority)),
                )
            })
            .chain(messages.iter().map(|m| (m, None, None)));
        let (
            mut exchanges,
            mut keys,
            mut headers,
            mut bodies,
            mut mandatory,
            mut ids,
            mut priorities,
        ) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for (m, id, priority) in all {
            exchanges.push(m.exchange.clone());
            keys.push(m.routing_key.clone());
            headers.push(serde_json::to_value(&m.headers).unwrap_or_default());
            bodies.push(m.body.clone());
            mandatory.push(m.routing == Routing::Required);
            ids.push(id);
            priorities.push(priority);
        }
        let statement = tx
            .prepare_cached(
                "INSERT INTO outbox (exchange, routing_key, headers, body, mandatory, message_id, priority)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::jsonb[], $4::bytea[], $5::bool[],
                                      $6::text[], $7::int2[])",
            )
            .await?;
        tx.execute(
            &statement,
            &[
                &exchanges,
                &keys,
                &headers,
                &bodies,
                &mandatory,
                &ids,
                &priorities,
            ],
        )
        .await?;
        Ok(())
    }

    /// Wakes this process's relay after a commit that wrote outbox rows.
    pub(crate) fn outbox_written(&self) {
        self.outbox_written.notify_one();
    }

    /// Publishes outbox rows until `shutdown`, deleting each batch only after the broker
    /// confirmed every row. Rows are taken with `SKIP LOCKED`, so any number of relays run.
    pub async fn relay_outbox(&self, publisher: Publisher, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            match self.relay_once(&publisher).await {
                Ok(n) if n as i64 == BATCH => {
                    failures = 0;
                    continue;
                }
                Ok(_) => failures = 0,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, failures, "outbox relay round failed");
                }
            }
            let pause = if failures == 0 {
                POLL
            } else {
                Duration::from_millis(200 * u64::from(failures.min(25)))
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.outbox_written.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Publishes one batch of outbox rows (urgent and high-priority jobs first, then oldest
    /// first) and deletes them once all are
    /// confirmed; returns how many. On any failure nothing is deleted (the batch is retried,
    /// so a row may be published twice, never lost).
    pub async fn relay_once(&self, publisher: &Publisher) -> Result<usize, String> {
        let publish = |m: OutboxMessage, message_id: Option<String>, priority: Option<i16>| {
            let publisher = publisher.clone();
            async move {
                match message_id {
                    // A delivery job: the properties the sender and the DLQ tools read.
                    Some(id) => {
                        let mut table = herald_amqp::FieldTable::default();
                        for (name, value) in m.headers {
                            table.insert(
                                name.into(),
                                herald_amqp::AMQPValue::LongString(value.into()),
                            );
                        }
                        let properties = herald_amqp::BasicProperties::default()
                            .with_content_type("application/json".into())
                            .with_message_id(id.into())
                            .with_priority(priority.and_then(|p| u8::try_from(p).ok()).unwrap_or(0))
                            .with_headers(table);
                        publisher
                            .publish_routed(
                                &m.exchange,
                                &m.routing_key,
                                &m.body,
                                properties,
                                m.routing,
                            )
                            .await
                    }
                    None => {
                        publisher
                            .publish_json(
                                &m.exchange,
                                &m.routing_key,
                                &m.body,
                                m.headers,
                                m.routing,
                            )
                            .await
                    }
                }
            }
        };
        let mut client = self.client().await.map_err(|e| e.to_string())?;
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        // Urgent and high-priority jobs first (their own index), then every row oldest first:
        // a campaign's jobs written earlier do not hold up an urgent one.
        let urgent_first = tx
            .prepare_cached(
                "SELECT id, exchange, routing_key, headers, body, mandatory, message_id, priority FROM outbox
                 WHERE priority > 3 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut rows = tx
            .query(&urgent_first, &[&BATCH])
            .await
            .map_err(|e| e.to_string())?;
        if (rows.len() as i64) < BATCH {
            let oldest_first = tx
                .prepare_cached(
                    "SELECT id, exchange, routing_key, headers, body, mandatory, message_id, priority FROM outbox
                     WHERE NOT coalesce(priority > 3, false) ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                )
                .await
                .map_err(|e| e.to_string())?;
            let rest = BATCH - rows.len() as i64;
            rows.extend(
                tx.query(&oldest_first, &[&rest])
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        if rows.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut confirms = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.get::<_, i64>(0));
            let headers: serde_json::Value = row.get(3);
            confirms.push(publish(
                OutboxMessage {
                    exchange: row.get(1),
                    routing_key: row.get(2),
                    headers: serde_json::from_value(headers).unwrap_or_default(),
                    body: row.get(4),
                    routing: if row.get(5) {
                        Routing::Required
                    } else {
                        Routing::Optional
                    },
                },
                row.get(6),
                row.get(7),
            ));
        }
        // Publishes are pipelined: every confirm is awaited together. Confirmed rows go; a row
        // the broker refused stays for the next round without holding back the others.
        let results = futures::future::join_all(confirms).await;
        let mut published = Vec::with_capacity(ids.len());
        let mut first_error = None;
        for (id, result) in ids.into_iter().zip(results) {
            match result {
                Ok(()) => published.push(id),
                Err(error) => {
                    first_error.get_or_insert_with(|| error.to_string());
                }
            }
        }
        let delete = tx
            .prepare_cached("DELETE FROM outbox WHERE id = ANY($1)")
            .await
            .map_err(|e| e.to_string())?;
        tx.execute(&delete, &[&published])
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        match first_error {
            None => Ok(published.len()),
            Some(error) => Err(format!(
                "{} of {} outbox rows not published: {error}",
                rows.len() - published.len(),
                rows.len()
            )),
        }
    }
}
