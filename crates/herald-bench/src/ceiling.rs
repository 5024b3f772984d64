//! The bare broker ceiling: publisher → queue A → relay (republishes with a confirm, then
//! acks) → queue B → consumer, with Herald's queue type and arguments (durable quorum queues,
//! delivery limit, reject-publish overflow), persistent messages, mandatory publishes,
//! publisher confirms, the same body size, publisher window and prefetch. No database and no
//! HTTP: what RabbitMQ alone allows for two confirmed hops on this machine, right now.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use crate::load::{confirmed_channel, connect, now};
use crate::stats::{Percentiles, sustained_rate};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Ceiling {
    pub messages: usize,
    pub body_bytes: usize,
    /// Messages consumed from B per second between the 10th and 90th percentile arrival.
    pub sustained_per_sec: f64,
    /// Publish → consumed from B.
    pub latency: Percentiles,
    pub publish_per_sec: f64,
}

fn queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(5));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args
}

async fn declare(channel: &Channel, name: &str) -> anyhow::Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            queue_args(),
        )
        .await
        .with_context(|| format!("declaring {name}"))?;
    Ok(())
}

fn properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

pub async fn run(
    url: &str,
    prefix: &str,
    messages: usize,
    body_bytes: usize,
    window: usize,
    prefetch: u16,
) -> anyhow::Result<Ceiling> {
    let queue_a = format!("{prefix}.ceiling.a");
    let queue_b = format!("{prefix}.ceiling.b");
    let admin = connect(url, "herald-bench-ceiling-admin").await?;
    let admin_channel = admin.create_channel().await?;
    declare(&admin_channel, &queue_a).await?;
    declare(&admin_channel, &queue_b).await?;
    let result = relay(
        url, &queue_a, &queue_b, messages, body_bytes, window, prefetch,
    )
    .await;
    for queue in [&queue_a, &queue_b] {
        let _ = admin_channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = admin.close(200, "OK".into()).await;
    result
}

async fn relay(
    url: &str,
    queue_a: &str,
    queue_b: &str,
    messages: usize,
    body_bytes: usize,
    window: usize,
    prefetch: u16,
) -> anyhow::Result<Ceiling> {
    // Three connections, as three processes would have.
    let producer = connect(url, "herald-bench-ceiling-producer").await?;
    let relay = connect(url, "herald-bench-ceiling-relay").await?;
    let sink = connect(url, "herald-bench-ceiling-sink").await?;

    // The sink: records when each index arrives from B.
    let sink_channel = sink.create_channel().await?;
    sink_channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut sink_consumer = sink_channel
        .basic_consume(
            queue_b.into(),
            "ceiling-sink".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let sink_task = tokio::spawn(async move {
        let mut arrived = vec![f64::NAN; messages];
        let mut count = 0;
        while count < messages {
            let Some(Ok(delivery)) = sink_consumer.next().await else {
                break;
            };
            let at = now();
            let index = delivery
                .data
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .and_then(|i| usize::try_from(i).ok());
            if let Some(slot) = index.and_then(|i| arrived.get_mut(i))
                && slot.is_nan()
            {
                *slot = at;
                count += 1;
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
        arrived
    });

    // The relay: consume A, publish to B with a confirm, ack A once confirmed.
    let relay_in = relay.create_channel().await?;
    relay_in
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let relay_out = confirmed_channel(&relay).await?;
    let mut relay_consumer = relay_in
        .basic_consume(
            queue_a.into(),
            "ceiling-relay".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let queue_b_owned = queue_b.to_string();
    let relay_task = tokio::spawn(async move {
        let _keep = relay_in;
        let mut acks = FuturesUnordered::new();
        loop {
            tokio::select! {
                next = relay_consumer.next() => {
                    let Some(Ok(delivery)) = next else { break };
                    let confirm = relay_out
                        .basic_publish(
                            "".into(),
                            queue_b_owned.as_str().into(),
                            BasicPublishOptions { mandatory: true, ..Default::default() },
                            &delivery.data,
                            properties(),
                        )
                        .await;
                    let Ok(confirm) = confirm else { break };
                    acks.push(async move {
                        if let Ok(Confirmation::Ack(None)) = confirm.await {
                            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                        }
                    });
                }
                Some(()) = acks.next(), if !acks.is_empty() => {}
            }
        }
    });

    // The producer: indexed bodies of `body_bytes`, pipelined confirms.
    let channel = confirmed_channel(&producer).await?;
    let mut published = vec![0.0; messages];
    let mut pending = FuturesUnordered::new();
    let start = now();
    for (index, slot) in published.iter_mut().enumerate() {
        while pending.len() >= window.max(1) {
            if let Some(result) = pending.next().await {
                result?;
            }
        }
        let mut body = vec![b' '; body_bytes.max(8)];
        body[..8].copy_from_slice(&(index as u64).to_be_bytes());
        *slot = now();
        let confirm = channel
            .basic_publish(
                "".into(),
                queue_a.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                properties(),
            )
            .await?;
        pending.push(async move {
            match confirm.await? {
                Confirmation::Ack(None) => Ok(()),
                other => bail!("ceiling publish not accepted: {other:?}"),
            }
        });
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    let publish_per_sec = messages as f64 / (now() - start).max(1e-9);

    let arrived = tokio::time::timeout(Duration::from_secs(600), sink_task)
        .await
        .context("the ceiling's consumer did not get every message within 600 s")??;
    relay_task.abort();
    for connection in [producer, relay, sink] {
        let _ = connection.close(200, "OK".into()).await;
    }
    let latencies: Vec<f64> = arrived
        .iter()
        .zip(&published)
        .filter(|(a, _)| !a.is_nan())
        .map(|(a, p)| a - p)
        .collect();
    let received: Vec<f64> = arrived.iter().copied().filter(|a| !a.is_nan()).collect();
    if received.len() < messages {
        bail!(
            "the ceiling lost messages: {} of {messages}",
            received.len()
        );
    }
    Ok(Ceiling {
        messages,
        body_bytes,
        sustained_per_sec: sustained_rate(&received),
        latency: Percentiles::of(&latencies),
        publish_per_sec,
    })
}
