//! The listening servers (the proxy port and, when asked for, a SOCKS5 port): accept loops
//! sharing one engine, one connection limit and one graceful shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use super::config::EngineConfig;
use super::connection::{self, Entry};
use super::flow::{Flow, Kind, Outcome};
use super::sink::FlowGuard;
use super::state::{Engine, EngineParts};

pub struct ProxyServer {
    engine: Arc<Engine>,
    local_addr: SocketAddr,
    socks_addr: Option<SocketAddr>,
    drain_tx: watch::Sender<bool>,
    close_tx: watch::Sender<bool>,
    stopped: Arc<Notify>,
    stopped_flag: Arc<std::sync::atomic::AtomicBool>,
    /// The accept loops: shutdown waits for them, so the listeners are closed when shutdown
    /// returns.
    accepting: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl ProxyServer {
    /// Binds the listening socket and starts accepting. Must run inside a tokio runtime.
    pub async fn bind(mut config: EngineConfig, parts: EngineParts) -> io::Result<ProxyServer> {
        // Raise the soft open-file limit to the hard one; the default connection limit follows.
        let open_files = super::limits::raise_open_files();
        if config.max_connections == 0 {
            config.max_connections = open_files
                .map(|(soft, _)| super::limits::connections_for(soft))
                .unwrap_or(super::limits::FALLBACK_MAX_CONNECTIONS);
        }
        match open_files {
            Some((soft, hard)) => log::info!(
                "open-file limit {soft} (hard {hard}); max_connections {} (two descriptors a connection, plus headroom)",
                config.max_connections
            ),
            None => log::info!("max_connections {}", config.max_connections),
        }
        let (engine, drain_tx, close_tx) = Engine::build(config, parts)?;
        let engine = Arc::new(engine);
        let listener = TcpListener::bind(engine.config.listen).await?;
        let local_addr = listener.local_addr()?;
        let socks_listener = match engine.config.socks_port {
            Some(port) => {
                let addr = SocketAddr::new(local_addr.ip(), port);
                let l = TcpListener::bind(addr).await.map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen for SOCKS5 on {addr}: {e}"))
                })?;
                Some(l)
            }
            None => None,
        };
        let socks_addr = match &socks_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        super::metrics_http::start(&engine).await?;
        let mut accepting = vec![tokio::spawn(accept_loop(
            listener,
            engine.clone(),
            Entry::Proxy,
        ))];
        if let Some(l) = socks_listener {
            accepting.push(tokio::spawn(accept_loop(l, engine.clone(), Entry::Socks)));
        }
        let server = ProxyServer {
            engine: engine.clone(),
            local_addr,
            socks_addr,
            drain_tx,
            close_tx,
            stopped: Arc::new(Notify::new()),
            stopped_flag: Arc::new(Default::default()),
            accepting: std::sync::Mutex::new(accepting),
        };
        tokio::spawn(super::memory::return_after_bursts(engine.clone()));
        tokio::spawn(sweep_pool(engine));
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The SOCKS5 port's address, when the server has one (`socks_port`).
    pub fn socks_addr(&self) -> Option<SocketAddr> {
        self.socks_addr
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Stops accepting, lets in-flight exchanges finish for up to `grace`, then closes the rest.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.drain_tx.send(true);
        let accepting =
            std::mem::take(&mut *self.accepting.lock().unwrap_or_else(|e| e.into_inner()));
        for task in accepting {
            let _ = task.await;
        }
        let engine = &self.engine;
        let deadline = tokio::time::Instant::now() + grace;
        while engine.active_connections() > 0 {
            let notified = engine.all_done.notified();
            if engine.active_connections() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let _ = self.close_tx.send(true);
        // Give cut-off connections a moment to unwind so their sockets are closed on return.
        let cut = tokio::time::Instant::now() + Duration::from_secs(2);
        while engine.active_connections() > 0 && tokio::time::Instant::now() < cut {
            let _ =
                tokio::time::timeout(Duration::from_millis(50), engine.all_done.notified()).await;
        }
        engine.pool.clear();
        super::metrics_http::stop(engine).await;
        self.stopped_flag.store(true, Ordering::Release);
        self.stopped.notify_waiters();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped_flag.load(Ordering::Acquire)
    }

    /// Resolves once shutdown finished.
    pub async fn stopped(&self) {
        loop {
            let n = self.stopped.notified();
            if self.is_stopped() {
                return;
            }
            n.await;
        }
    }
}

async fn accept_loop(listener: TcpListener, engine: Arc<Engine>, entry: Entry) {
    let mut draining = engine.draining.clone();
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = draining.wait_for(|d| *d) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors (EMFILE/ENFILE) and the like: never stop accepting.
                // Back off so the loop does not spin while nothing can be accepted, and say so
                // at most once a second; connections closing free descriptors and it recovers.
                failures.note(&e);
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        failures.recovered();
        let _ = stream.set_nodelay(true);
        let id = engine.next_conn_id.fetch_add(1, Ordering::Relaxed);
        engine.stats().connection_accepted();
        if engine.active.fetch_add(1, Ordering::AcqRel) >= engine.config.max_connections {
            tokio::spawn(refuse(stream, peer, id, engine.clone(), entry));
            continue;
        }
        let engine = engine.clone();
        match super::lanes::lanes() {
            // The socket leaves this runtime's poller for the lane's.
            Some(lanes) => match stream.into_std() {
                Ok(stream) => lanes.spawn(async move {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => serve_until_closing(&engine, stream, peer, id, entry).await,
                        Err(e) => log::warn!("connection {id}: cannot register on its lane: {e}"),
                    }
                    finish_connection(&engine);
                }),
                Err(e) => {
                    log::warn!("connection {id}: cannot hand over to a lane: {e}");
                    finish_connection(&engine);
                }
            },
            None => {
                tokio::spawn(async move {
                    serve_until_closing(&engine, stream, peer, id, entry).await;
                    finish_connection(&engine);
                });
            }
        }
    }
}

async fn serve_until_closing(
    engine: &Arc<Engine>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    entry: Entry,
) {
    let mut closing = engine.closing.clone();
    tokio::select! {
        _ = connection::serve_client(engine, stream, peer, id, entry) => {}
        _ = closing.wait_for(|c| *c) => {}
    }
}

/// How long the accept loop waits after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Failed accepts, logged at most once a second with how many there were.
#[derive(Default)]
struct AcceptFailures {
    last_log: Option<std::time::Instant>,
    since_log: u64,
    failing: bool,
}

impl AcceptFailures {
    fn once_a_second(&self) -> bool {
        self.last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
    }

    fn note(&mut self, e: &io::Error) {
        self.failing = true;
        self.since_log += 1;
        if self.once_a_second() {
            let why = match e.raw_os_error() {
                Some(libc::EMFILE) | Some(libc::ENFILE) => " (out of file descriptors: raise the open-file limit or lower --max-connections)",
                _ => "",
            };
            log::warn!(
                "accept failed {} time(s) in the last second: {e}{why}; backing off",
                self.since_log
            );
            self.last_log = Some(std::time::Instant::now());
            self.since_log = 0;
        }
    }

    fn recovered(&mut self) {
        if self.failing && self.once_a_second() {
            log::warn!("accepting connections again");
            self.failing = false;
            self.last_log = Some(std::time::Instant::now());
        }
    }
}

fn finish_connection(engine: &Engine) {
    if engine.active.fetch_sub(1, Ordering::AcqRel) == 1 {
        engine.all_done.notify_waiters();
    }
}

/// Refuses a connection past the limit: a 503 on the proxy port; on the SOCKS port, which
/// has no reply before the handshake for it, the connection is closed.
async fn refuse(
    mut stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    engine: Arc<Engine>,
    entry: Entry,
) {
    let body = format!(
        "segproxy: too many connections (limit {})\n",
        engine.config.max_connections
    );
    let flow = Flow {
        id: format!("{id}.1"),
        client: Some(peer),
        method: "-".into(),
        target: "-".into(),
        status: 503,
        kind: Kind::Refused,
        policy: "none".into(),
        error: Some(body.trim_end().to_string()),
        outcome: Outcome::RefusedLimit,
        ..Default::default()
    };
    FlowGuard::begin(&engine.sinks, &engine.closing, flow).commit();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        body
    );
    if entry == Entry::Proxy {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            stream.write_all(response.as_bytes()),
        )
        .await;
    }
    let _ = stream.shutdown().await;
    finish_connection(&engine);
}

async fn sweep_pool(engine: Arc<Engine>) {
    let mut closing = engine.closing.clone();
    // Often enough that an idle connection outlives its timeout by at most half of it.
    let every = (engine.config.pool_idle_timeout / 2)
        .clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => engine.pool.sweep(),
            _ = closing.wait_for(|c| *c) => return,
        }
    }
}
