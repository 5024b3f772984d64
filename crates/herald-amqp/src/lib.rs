//! RabbitMQ plumbing shared by every Herald service.
//!
//! - [`Topology`] names and declares the exchanges and queues (idempotently, under a prefix).
//! - [`Broker`] owns one connection (opened again when lost) and a confirmed [`Publisher`].
//! - [`dead_letter`] parks a message in the dead-letter queue with reason headers.
//! - [`trace`] carries W3C trace context in AMQP headers.

mod broker;
mod consume;
pub mod depth;
mod headers;
mod topology;
pub mod trace;

pub use broker::{Broker, Consumer, Delivery, Publisher, Routing, dead_letter, republishable};
pub use consume::Disposition;
pub use headers::{header_i64, header_str, header_u32, headers_without};
pub use lapin;
pub use lapin::BasicProperties;
pub use lapin::types::{AMQPValue, FieldTable};
pub use topology::{AmqpSettings, Lane, RetryTier, Topology, parse_delay};

/// Errors from the broker.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("amqp settings: {0}")]
    Config(String),
    #[error("rabbitmq: {0}")]
    Broker(#[from] lapin::Error),
    #[error("rabbitmq refused message for {exchange}/{routing_key} (nack)")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error("the broker ended the subscription to {0}")]
    Cancelled(String),
    #[error("rabbitmq did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the broker connection was closed")]
    Closed,
    #[error("message for {exchange}/{routing_key} was unroutable")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
}
