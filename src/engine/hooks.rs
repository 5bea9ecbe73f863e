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
    Forward(ForwardOrder),
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
}

/// A user handler: makes connection handlers and says which hooks exist.
pub trait Handler: Send + Sync {
    fn hooks(&self) -> HookSet;
    fn open(&self, meta: ConnectionMeta) -> Box<dyn ConnectionHandler>;
}
