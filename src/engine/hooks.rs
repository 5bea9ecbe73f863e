//! The engine's side of user hooks, with no Python in it. A `Handler` says once which hooks it
//! implements; the engine asks it for a `ConnectionHandler` per client connection (lazily, the
//! first time a hook applies) and talks to it with plain Rust messages:
//!
//! - per request, the handler answers with a stream of `HandlerCommand`s (forward, write raw
//!   bytes, read the body, finish, fail);
//! - while forwarding, the engine asks about the response head, each body chunk and completion,
//!   each answered through a oneshot channel.
//!
//! A dropped sender is an answer too ("the handler went away"), so nothing here can hang; every
//! wait is also bounded by the engine's hook timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::http1::Headers;
use super::segment::SegmentPolicy;

/// Which hooks a handler implements; the engine never calls the others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookSet {
    pub client_connected: bool,
    pub request: bool,
    pub response: bool,
    pub response_chunk: bool,
    pub response_complete: bool,
    pub error: bool,
    pub connect: bool,
    pub tunnel: bool,
    /// `on_authenticate`: judges Proxy-Authorization schemes (and Basic credentials) that
    /// the configured credentials do not settle.
    pub authenticate: bool,
    /// `on_websocket_message`: upgraded WebSocket connections are relayed message by message
    /// (without it, as bytes).
    pub websocket_message: bool,
}

impl HookSet {
    pub fn any_response(&self) -> bool {
        self.response || self.response_chunk || self.response_complete
    }
    pub fn is_empty(&self) -> bool {
        *self == HookSet::default()
    }
}

/// Facts about the client connection, given when its handler is created.
#[derive(Clone, Debug)]
pub struct ConnectionMeta {
    pub id: u64,
    pub client: SocketAddr,
}

/// A request as a handler sees and may change it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestParts {
    pub method: String,
    /// "http" or "https" (intercepted).
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// Path and query.
    pub path: String,
    /// "HTTP/1.1" or "HTTP/1.0".
    pub version: String,
    pub headers: Headers,
}

/// A response head as a handler sees and may change it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseParts {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
}

/// What to forward when a handler says so.
#[derive(Debug)]
pub struct ForwardOrder {
    /// The request to send (the handler may have changed any part of it).
    pub request: RequestParts,
    /// A replacement body; None streams the (rest of the) client's body.
    pub body: Option<Bytes>,
    /// Segmentation for this flow, overriding the rules' choice.
    pub policy: Option<SegmentPolicy>,
}

/// What a handler tells the engine while it handles one request.
#[derive(Debug)]
pub enum HandlerCommand {
    /// Forward the request to its destination (response hooks then run as the engine reads it).
    Forward(Box<ForwardOrder>),
    /// Raw bytes for the client (the handler writes its own response, status line included).
    Write(Bytes),
    /// Send the next piece of the client's request body; None at its end.
    ReadBody(oneshot::Sender<Result<Option<Bytes>, String>>),
    /// The request hook returned.
    Finish,
    /// The request hook raised; the message is for the log and the client's 502.
    Fail(String),
}

/// How a handler wants a CONNECT handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectDecision {
    /// Whatever rules and configuration say.
    Default,
    Tunnel,
    Intercept,
    Block(String),
}

pub type Reply<T> = oneshot::Receiver<Result<T, String>>;

/// One WebSocket message (reassembled from its frames, decompressed) as a handler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebSocketMessage {
    pub from_client: bool,
    pub is_text: bool,
    pub content: Bytes,
}

/// What a handler made of a WebSocket message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageVerdict {
    /// Send it on as it came (its original frames, compressed or not).
    Keep,
    /// Send this content instead (same type, text or binary).
    Replace(Bytes),
    /// Send nothing.
    Drop,
}

/// A message a handler adds to a WebSocket connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectedMessage {
    pub content: Bytes,
    pub is_text: bool,
}

/// Queues messages a handler injects into an upgraded WebSocket connection, each toward the
/// client or the server; they go out after the message in hand.
#[derive(Clone, Debug)]
pub struct WebSocketInjector {
    pub to_client: mpsc::UnboundedSender<InjectedMessage>,
    pub to_server: mpsc::UnboundedSender<InjectedMessage>,
}

impl WebSocketInjector {
    /// False once that direction of the connection is closed.
    pub fn inject(&self, to_client: bool, message: InjectedMessage) -> bool {
        let queue = if to_client {
            &self.to_client
        } else {
            &self.to_server
        };
        queue.send(message).is_ok()
    }
}

/// One client connection's handler (one per connection, as asyncio-https-proxy builds them).
pub trait ConnectionHandler: Send + Sync {
    /// A request arrived; commands about it come on the returned channel.
    fn request(&self, request: RequestParts) -> mpsc::UnboundedReceiver<HandlerCommand>;
    /// The response head arrived; the reply is the head to send (possibly changed).
    fn response(&self, response: ResponseParts) -> Reply<ResponseParts>;
    /// A piece of the response body; the reply is what to send instead (None drops it).
    fn response_chunk(&self, chunk: Bytes) -> Reply<Option<Bytes>>;
    /// The response was sent in full.
    fn response_complete(&self) -> Reply<()>;
    /// Something failed in this connection's current exchange (fire and forget).
    fn error(&self, message: String);
    /// A CONNECT to `host:port` arrived.
    fn connect(&self, host: String, port: u16) -> Reply<ConnectDecision>;
    /// A tunnel opened (after 200) or closed (with byte counts each way).
    fn tunnel_opened(&self, host: String, port: u16);
    fn tunnel_closed(&self, host: String, port: u16, bytes_up: u64, bytes_down: u64);
    /// The client connection ended; the handler may release its state.
    fn closed(&self);
    /// Whether the credentials of a Proxy-Authorization (`scheme`, then the rest as sent) let
    /// the request through. Handlers without the hook refuse.
    fn authenticate(&self, scheme: String, credentials: String) -> Reply<bool> {
        let _ = (scheme, credentials);
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(false));
        rx
    }
    /// A WebSocket upgrade starts its message relay; `injector` adds messages to it.
    fn websocket_opened(&self, injector: WebSocketInjector) {
        let _ = injector;
    }
    /// A WebSocket message; the reply says whether it goes on, changed, or not at all.
    fn websocket_message(&self, message: WebSocketMessage) -> Reply<MessageVerdict> {
        let _ = message;
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(MessageVerdict::Keep));
        rx
    }
    /// The WebSocket connection ended (nothing can be injected any more).
    fn websocket_closed(&self) {}
}

/// A user handler: makes connection handlers and says which hooks exist.
pub trait Handler: Send + Sync {
    fn hooks(&self) -> HookSet;
    fn open(&self, meta: ConnectionMeta) -> Box<dyn ConnectionHandler>;
}

/// Waits for handler answers, tracking how many waits are in progress.
///
/// A hook answered on another thread typically comes back within a few tens of µs, and parking
/// a tokio worker and waking it again costs about as much on a small virtual machine. So when a
/// wait is the only one in progress it first polls for a short budget, yielding to other tasks
/// between polls, and only then parks. With other waits in progress the proxy is busy and every
/// wait parks at once: polling never takes CPU from flows that have work to do.
#[derive(Debug)]
pub struct HookWaits {
    in_progress: AtomicUsize,
    poll_budget: Duration,
}

/// Default polling budget of a lone wait: longer than a typical trivial hook takes.
pub const HOOK_POLL_BUDGET: Duration = Duration::from_micros(50);

impl Default for HookWaits {
    fn default() -> Self {
        HookWaits::new(HOOK_POLL_BUDGET)
    }
}

impl HookWaits {
    pub fn new(poll_budget: Duration) -> Self {
        HookWaits {
            in_progress: AtomicUsize::new(0),
            poll_budget,
        }
    }

    /// Starts a wait; it counts as in progress until the returned guard is dropped.
    pub fn begin(&self) -> HookWait<'_> {
        let others = self.in_progress.fetch_add(1, Ordering::AcqRel);
        let budget = if others == 0 {
            self.poll_budget
        } else {
            Duration::ZERO
        };
        HookWait {
            waits: self,
            budget,
        }
    }

    /// Waits in progress right now.
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Acquire)
    }
}

pub struct HookWait<'a> {
    waits: &'a HookWaits,
    budget: Duration,
}

impl HookWait<'_> {
    /// Polls `try_now` until it gives a value or the budget is spent; None means "await
    /// normally". `try_now` returns None while the answer is still pending.
    pub async fn early<T>(&self, mut try_now: impl FnMut() -> Option<T>) -> Option<T> {
        if self.budget.is_zero() {
            return None;
        }
        let start = Instant::now();
        loop {
            if let Some(value) = try_now() {
                return Some(value);
            }
            if start.elapsed() >= self.budget {
                return None;
            }
            tokio::task::yield_now().await;
        }
    }

    /// The answer on `reply` (None: the handler went away), polled first when this wait is
    /// alone, then awaited.
    pub async fn reply<T>(&self, reply: &mut Reply<T>) -> Option<Result<T, String>> {
        let early = self
            .early(|| match reply.try_recv() {
                Ok(value) => Some(Some(value)),
                Err(oneshot::error::TryRecvError::Empty) => None,
                Err(oneshot::error::TryRecvError::Closed) => Some(None),
            })
            .await;
        match early {
            Some(answer) => answer,
            None => reply.await.ok(),
        }
    }

    /// The next command on `commands` (None: the handler went away), polled first when alone.
    pub async fn command(
        &self,
        commands: &mut mpsc::UnboundedReceiver<HandlerCommand>,
    ) -> Option<HandlerCommand> {
        let early = self
            .early(|| match commands.try_recv() {
                Ok(command) => Some(Some(command)),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
            })
            .await;
        match early {
            Some(answer) => answer,
            None => commands.recv().await,
        }
    }
}

impl Drop for HookWait<'_> {
    fn drop(&mut self) {
        self.waits.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_wait_gets_an_answer_sent_from_another_thread() {
        let waits = HookWaits::default();
        for delay_us in [0u64, 10, 200] {
            let (tx, mut rx) = oneshot::channel::<Result<u32, String>>();
            let sender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_micros(delay_us));
                tx.send(Ok(7)).unwrap();
            });
            let wait = waits.begin();
            assert_eq!(waits.in_progress(), 1);
            assert_eq!(wait.reply(&mut rx).await, Some(Ok(7)));
            drop(wait);
            sender.join().unwrap();
        }
        assert_eq!(waits.in_progress(), 0);
    }

    #[tokio::test]
    async fn only_a_lone_wait_polls_and_a_dropped_sender_ends_the_wait() {
        let waits = HookWaits::new(Duration::from_secs(5));
        let first = waits.begin();
        let second = waits.begin();
        assert_eq!(waits.in_progress(), 2);
        // The second wait does not poll: with no answer it gives up at once.
        let t = Instant::now();
        assert_eq!(second.early(|| None::<()>).await, None);
        assert!(t.elapsed() < Duration::from_secs(1));
        drop(second);
        // A sender dropped while the lone wait polls ends the wait with an error, not a hang.
        let (tx, mut rx) = oneshot::channel::<Result<u32, String>>();
        drop(tx);
        assert!(first.reply(&mut rx).await.is_none());
        let (tx, mut commands) = mpsc::unbounded_channel();
        tx.send(HandlerCommand::Finish).unwrap();
        drop(tx);
        assert!(matches!(
            first.command(&mut commands).await,
            Some(HandlerCommand::Finish)
        ));
        assert!(first.command(&mut commands).await.is_none());
        drop(first);
        assert_eq!(waits.in_progress(), 0);
    }
}
