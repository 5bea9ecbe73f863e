//! What one client connection carries across its exchanges: its ids, its mode (proxy or
//! inside an intercepted CONNECT) and the user handler made for it on first need.

use std::net::SocketAddr;

use super::hooks::{ConnectionHandler, ConnectionMeta};
use super::segment::{RawSocket, SegmentPolicy};
use super::state::Engine;

/// Where requests on a connection come from, which fixes how their targets are read.
#[derive(Clone, Debug)]
pub enum Mode {
    /// A client talking to us as its proxy: absolute-form targets and CONNECT.
    Proxy,
    /// Requests inside an intercepted CONNECT: origin-form targets for this destination.
    /// `up_policy` segments the encrypted bytes of new origin connections;
    /// `down_segmenting` says whether the client's encrypted bytes are segmented below TLS.
    Intercepted {
        host: String,
        port: u16,
        up_policy: SegmentPolicy,
        down_segmenting: bool,
    },
}

/// Per-connection facts shared by its exchanges.
pub struct ConnInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub exchanges: u64,
    /// The HTTP/2 stream this state serves (each stream has its own): its exchange's id is
    /// `CONNECTION.h2-STREAM`.
    pub stream: Option<u32>,
}

impl ConnInfo {
    /// The id of the connection's next exchange: `CONNECTION.N`.
    pub fn next_id(&mut self) -> String {
        self.exchanges += 1;
        match self.stream {
            Some(stream) => format!("{}.h2-{stream}", self.id),
            None => format!("{}.{}", self.id, self.exchanges),
        }
    }
}

/// Per-connection state: the user handler for this client connection, made on first need.
pub struct ConnState {
    pub info: ConnInfo,
    handler: Option<Box<dyn ConnectionHandler>>,
    /// The proxy address the client connected to (named in the answer to non-HTTP bytes).
    pub local: Option<SocketAddr>,
    /// The client's socket, for a fault's reset of a plain exchange (`fault=reset@N`).
    pub client_fd: Option<RawSocket>,
}

impl ConnState {
    pub fn new(id: u64, peer: SocketAddr) -> Self {
        ConnState {
            info: ConnInfo {
                id,
                peer,
                exchanges: 0,
                stream: None,
            },
            handler: None,
            local: None,
            client_fd: None,
        }
    }

    /// The connection's handler, created when a hook first applies.
    pub fn handler(&mut self, engine: &Engine) -> Option<&dyn ConnectionHandler> {
        let user = engine.handler.as_ref()?;
        if self.handler.is_none() {
            self.handler = Some(user.open(ConnectionMeta {
                id: self.info.id,
                client: self.info.peer,
            }));
        }
        self.handler.as_deref()
    }

    /// Reports a failure the engine saw (not one a hook raised, which the handler knows).
    pub fn report_error(&mut self, engine: &Engine, message: &str) {
        if engine.hooks.error || engine.hooks.any_response() || engine.hooks.request {
            if let Some(h) = self.handler(engine) {
                h.error(message.to_string());
            }
        }
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        if let Some(h) = &self.handler {
            h.closed();
        }
    }
}
