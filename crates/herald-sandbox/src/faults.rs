//! Transport faults on chosen calls: an HTTP error status, a late answer, or a connection
//! dropped before or after the call was processed, so senders can be tested against the
//! failures WeChat's table files under "HTTP 5xx / timeout / connection reset".

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::Sandbox;

/// What the sandbox does to one call instead of answering it normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Behave normally for this call.
    None,
    /// Answer this HTTP status without processing the call.
    Status { status: u16 },
    /// Process the call, then answer this much later (a caller with a shorter timeout gives
    /// up without knowing that the message went out).
    Delay { ms: u64 },
    /// Drop the connection without processing the call.
    Reset,
    /// Process the call, then drop the connection before the answer is complete.
    ResetAfter,
}

/// Per path: faults for the next calls, in order.
#[derive(Default)]
pub(crate) struct Faults {
    queued: HashMap<String, VecDeque<Fault>>,
    /// Per path: faults drawn at random for every call without a queued one.
    random: HashMap<String, FaultRates>,
    /// Faults drawn so far, by kind. A held call's client may hang up before the answer, and
    /// then the call is never logged: this counts it anyway.
    drawn: HashMap<&'static str, u64>,
}

/// Faults drawn at random, call by call, for a provider that is flaky for a while (the fault
/// suite's "30% 503, 10% held past the client's timeout"). Ratios are of all calls; their sum
/// is at most 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FaultRates {
    /// Share of calls answered `status` without being processed.
    pub status_ratio: f64,
    pub status: u16,
    /// Share of calls processed, then answered `delay_ms` later.
    pub delay_ratio: f64,
    pub delay_ms: u64,
}

impl FaultRates {
    fn draw(&self) -> Fault {
        let roll: f64 = rand::random();
        if roll < self.status_ratio {
            Fault::Status {
                status: self.status,
            }
        } else if roll < self.status_ratio + self.delay_ratio {
            Fault::Delay { ms: self.delay_ms }
        } else {
            Fault::None
        }
    }
}

impl Sandbox {
    /// The next calls to `path` get these faults, one per call in order; then normal behaviour
    /// resumes. [`Fault::None`] lets one call through; an empty list clears the queue. Faults
    /// apply before injected errcodes (a faulted call that is processed may still take one).
    pub fn inject_faults(&self, path: &str, faults: Vec<Fault>) {
        let mut state = self.lock();
        if faults.is_empty() {
            state.faults.queued.remove(path);
        } else {
            state
                .faults
                .queued
                .entry(path.to_owned())
                .or_default()
                .extend(faults);
        }
    }

    /// From now on every call to `path` without a queued fault draws one from `rates`;
    /// `None` turns the random faults off.
    pub fn set_fault_rates(&self, path: &str, rates: Option<FaultRates>) {
        let mut state = self.lock();
        match rates {
            Some(rates) => state.faults.random.insert(path.to_owned(), rates),
            None => state.faults.random.remove(path),
        };
    }

    /// How many calls drew each kind of random fault (`status`, `delay`, `none`).
    pub fn drawn_faults(&self) -> HashMap<&'static str, u64> {
        self.lock().faults.drawn.clone()
    }

    /// The fault for this call of `path`: the next queued one, else one drawn from its rates.
    pub(crate) fn take_fault(&self, path: &str) -> Option<Fault> {
        let mut state = self.lock();
        let fault = match state.faults.queued.get_mut(path) {
            Some(queue) => {
                let fault = queue.pop_front();
                if queue.is_empty() {
                    state.faults.queued.remove(path);
                }
                fault
            }
            None => {
                let rates = state.faults.random.get(path).copied()?;
                let drawn = rates.draw();
                let kind = match drawn {
                    Fault::Status { .. } => "status",
                    Fault::Delay { .. } => "delay",
                    _ => "none",
                };
                *state.faults.drawn.entry(kind).or_default() += 1;
                Some(drawn)
            }
        };
        fault.filter(|f| *f != Fault::None)
    }
}

/// The answer to a call with an HTTP-status fault.
pub(crate) fn status_response(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body =
        serde_json::json!({ "errcode": -1, "errmsg": format!("sandbox: injected HTTP {status}") });
    (code, Json(body)).into_response()
}

/// A response whose body fails after the headers: the server drops the connection mid-answer.
pub(crate) fn reset_response() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "sandbox: injected connection reset",
        ))
    });
    Response::new(Body::from_stream(failing))
}

/// How long a `Delay` fault holds the answer.
pub(crate) fn delay_of(fault: Option<Fault>) -> Option<Duration> {
    match fault {
        Some(Fault::Delay { ms }) => Some(Duration::from_millis(ms)),
        _ => None,
    }
}

#[derive(Deserialize)]
pub(crate) struct InjectFaults {
    path: String,
    faults: Vec<Fault>,
}

/// `POST /_sandbox/faults` `{"path": "/cgi-bin/message/template/send", "faults": [{"kind": "status", "status": 500}, {"kind": "reset_after"}]}`
pub(crate) async fn inject(
    State(sandbox): State<Sandbox>,
    Json(body): Json<InjectFaults>,
) -> StatusCode {
    sandbox.inject_faults(&body.path, body.faults);
    StatusCode::NO_CONTENT
}
