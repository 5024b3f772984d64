//! Publish one Herald notification over AMQP with lapin 4.12 and follow its status events.
//! See docs/contract.md for every field, property and header.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("HERALD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let amqp_user = std::env::var("HERALD_AMQP_USER").unwrap_or_else(|_| "guest".into());
    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;

    // 1. Subscribe to the tenant's status events before publishing (a private queue).
    let subscriber = connection.create_channel().await?;
    let queue = subscriber
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    subscriber
        .queue_bind(
            queue.name().as_str().into(),
            "herald.status".into(),
            "status.demo.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut statuses = subscriber
        .basic_consume(
            queue.name().as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    // 2. The request (canonical proto3 JSON of herald.v1.NotificationRequest).
    let message_id = uuid::Uuid::new_v4().to_string();
    let body = serde_json::to_vec(&json!({
        "template": {"id": "order_shipped"},
        "variables": {"order_id": "A-1001", "carrier": "SF Express", "eta": "tomorrow"},
        "recipients": [{"wechatOpenid": "oDemoUser000000000000000001x"}],
        "channels": ["wechat.template"],
    }))?;

    // 3. Properties and headers, then publish with a confirm; mandatory makes "no route" visible.
    let mut headers = FieldTable::default();
    headers.insert(
        "x-herald-schema".into(),
        AMQPValue::LongString("herald.v1".into()),
    );
    // Propagate your own trace here; this one is a fixed example.
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    );
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2) // persistent
        .with_user_id(amqp_user.as_str().into()) // must be the user you connected as
        .with_message_id(message_id.as_str().into())
        .with_headers(headers);

    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let confirmation = channel
        .basic_publish(
            "herald.requests".into(),
            "request.shop".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            properties,
        )
        .await? // sent
        .await?; // confirmed
    match confirmation {
        Confirmation::Ack(None) => println!("published message {message_id}"),
        Confirmation::Ack(Some(returned)) => {
            return Err(format!("unroutable: {}", returned.reply_text).into());
        }
        Confirmation::Nack(_) => return Err("RabbitMQ refused the message; publish again".into()),
        Confirmation::NotRequested => unreachable!("confirms are enabled"),
    }

    // 4. Status events of this message until it settles.
    let follow = async {
        while let Some(delivery) = statuses.next().await {
            let delivery = delivery?;
            let event: serde_json::Value = serde_json::from_slice(&delivery.data)?;
            if event["messageId"] != message_id.as_str() {
                continue;
            }
            println!("  {} delivery {}", delivery.routing_key, event["deliveryId"]);
            if let Some(
                "DELIVERY_STATE_DELIVERED"
                | "DELIVERY_STATE_FAILED"
                | "DELIVERY_STATE_EXPIRED"
                | "DELIVERY_STATE_SUPPRESSED",
            ) = event["state"].as_str()
            {
                break;
            }
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    tokio::time::timeout(Duration::from_secs(30), follow).await??;
    connection.close(200, "bye".into()).await?;
    Ok(())
}
