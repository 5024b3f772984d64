//! End-to-end tests: the sandbox on 127.0.0.1:0, driven over HTTP with reqwest.

mod callbacks;
mod common;
mod control;
mod request_log;
mod template_send;
mod tokens;
