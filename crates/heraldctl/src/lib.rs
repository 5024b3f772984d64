//! `heraldctl`'s library: the deployment-wide configuration, the demo seed, and the
//! in-process stack (all five services plus the provider sandbox).

pub mod config;
pub mod demo;
pub mod dlq;
pub mod recipients;
pub mod stack;
pub mod templates;

pub use config::HeraldConfig;
pub use stack::{SenderHandle, ServiceHandle, Stack, StackError};
