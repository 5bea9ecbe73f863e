//! Helpers shared by the engine's unit tests.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Polls `fut` once (registering its waker, a timer's entry, ...) and says what it gave.
pub async fn poll_once<F: Future + Unpin>(mut fut: F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await
}
