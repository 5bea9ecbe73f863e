//! Why a flow failed, in one type for every path (exchange, CONNECT, authentication): what the
//! records say, the status to answer with (if an answer can still be sent), whether the client
//! connection can carry on, and whether the handler has already seen it. Also the one mapping
//! of a hook that fails or does not answer in time to a status.

use std::time::Duration;

use super::hooks::{HookWaits, Reply};
use super::outcome::Outcome;

#[derive(Debug)]
pub struct FlowError {
    /// What the records will say happened.
    pub outcome: Outcome,
    /// The status to answer with; None when the response had started (the connection is
    /// closed instead).
    pub status: Option<u16>,
    pub message: String,
    /// The client's request was fully read, so its connection can carry on.
    pub client_usable: bool,
    /// Raised by a user hook: the handler has seen it already and is not told again.
    pub handler_knows: bool,
}

impl FlowError {
    /// A failure answered with `status`.
    pub fn answer(status: u16, message: impl Into<String>, client_usable: bool) -> Self {
        FlowError {
            outcome: Outcome::of_status(status),
            status: Some(status),
            message: message.into(),
            client_usable,
            handler_knows: false,
        }
    }
    /// The destination cut the response after it had started: nothing can be answered.
    pub fn cut(message: impl Into<String>) -> Self {
        FlowError {
            outcome: Outcome::OriginAborted,
            status: None,
            message: message.into(),
            client_usable: false,
            handler_knows: false,
        }
    }
    /// The client went away: nothing can be answered.
    pub fn client_gone(message: impl Into<String>) -> Self {
        FlowError {
            outcome: Outcome::ClientAborted,
            ..FlowError::cut(message)
        }
    }
    /// The response had started when something other than the destination failed.
    pub fn cut_error(message: impl Into<String>) -> Self {
        FlowError {
            outcome: Outcome::Error,
            ..FlowError::cut(message)
        }
    }
    /// Marks a failure the handler's own hook raised.
    pub fn from_hook(mut self) -> Self {
        self.handler_knows = true;
        self
    }
}

impl From<(u16, String)> for FlowError {
    fn from((status, message): (u16, String)) -> Self {
        FlowError::answer(status, message, false)
    }
}

/// Waits for a hook's reply for up to `timeout`. A hook that does not answer in time is a
/// 504; one whose handler went away, or that raised, a 502 (a raised hook is marked
/// `handler_knows`: its exception already went to `on_error`).
pub async fn await_hook<T>(
    waits: &HookWaits,
    timeout: Duration,
    mut reply: Reply<T>,
    hook: &str,
) -> Result<T, FlowError> {
    let wait = waits.begin();
    match tokio::time::timeout(timeout, wait.reply(&mut reply)).await {
        Err(_) => Err(FlowError::answer(
            504,
            format!("hook {hook} did not return within {timeout:?}"),
            false,
        )),
        Ok(None) => Err(FlowError::answer(
            502,
            format!("hook {hook}: the handler went away"),
            false,
        )),
        Ok(Some(Err(message))) => {
            Err(FlowError::answer(502, format!("hook {hook} failed: {message}"), false).from_hook())
        }
        Ok(Some(Ok(value))) => Ok(value),
    }
}
