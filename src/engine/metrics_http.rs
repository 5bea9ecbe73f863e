//! `GET /metrics`: the server's counters ([`super::stats`]) in Prometheus text format, on a
//! listener of its own (`EngineConfig::stats_port`, on the proxy's listen address). One
//! request a connection, answered and closed; 404 for any other path. It stops when the
//! server shuts down.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::state::Engine;
use super::stats::PROMETHEUS_CONTENT_TYPE;

/// Longest time a scraper gets to send its request and read the answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head read (a scrape's is a few hundred bytes).
const MAX_HEAD: usize = 16 * 1024;
/// Most scrapes answered at once; connections past it are closed unanswered.
const MAX_IN_FLIGHT: usize = 64;

/// Binds the metrics listener if the config asks for one and starts serving it. Fails (the
/// server does not start) when the port cannot be had.
pub async fn start(engine: &Arc<Engine>) -> io::Result<()> {
    let Some(port) = engine.config.stats_port else {
        return Ok(());
    };
    let addr = SocketAddr::new(engine.config.listen.ip(), port);
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot serve metrics on {addr} (stats port): {e}"),
        )
    })?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(serve(listener, engine.clone()));
    log::info!("serving metrics at http://{local}/metrics");
    *engine
        .stats()
        .endpoint
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some((local, task));
    Ok(())
}

/// Stops serving metrics: when this returns, the listener and every scrape's connection are
/// closed.
pub async fn stop(engine: &Engine) {
    let endpoint = engine
        .stats()
        .endpoint
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some((_, task)) = endpoint {
        task.abort();
        let _ = task.await;
    }
}

async fn serve(listener: TcpListener, engine: Arc<Engine>) {
    let mut closing = engine.closing.clone();
    // Owned here: aborting this task drops the set, which aborts the scrapes in flight.
    let mut answering = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = answering.join_next(), if !answering.is_empty() => continue,
            _ = closing.wait_for(|c| *c) => return,
        };
        match accepted {
            Ok((stream, _)) if answering.len() < MAX_IN_FLIGHT => {
                let engine = engine.clone();
                answering.spawn(async move {
                    let _ = tokio::time::timeout(ANSWER_TIMEOUT, answer(stream, &engine)).await;
                });
            }
            Ok(_) => {}
            // Out of descriptors and the like: back off, never stop.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// What a request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics { head_only: bool },
    WrongMethod,
    NotFound,
    Malformed,
}

/// Reads one request head; None when the client closed or sent nothing readable in time.
async fn read_request(stream: &mut TcpStream) -> Option<Asked> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse(&buf) {
            Some(asked) => return Some(asked),
            None if buf.len() > MAX_HEAD => return Some(Asked::Malformed),
            None => {}
        }
    }
}

/// The request in `buf`, or None while its head is incomplete.
fn parse(buf: &[u8]) -> Option<Asked> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Asked::Malformed),
        Ok(httparse::Status::Complete(_)) => {
            let path = request.path.unwrap_or("");
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            Some(match (path, request.method.unwrap_or("")) {
                ("/metrics", "GET") => Asked::Metrics { head_only: false },
                ("/metrics", "HEAD") => Asked::Metrics { head_only: true },
                ("/metrics", _) => Asked::WrongMethod,
                _ => Asked::NotFound,
            })
        }
    }
}

async fn answer(mut stream: TcpStream, engine: &Engine) {
    let Some(asked) = read_request(&mut stream).await else {
        return;
    };
    let (status, content_type, extra, body) = match asked {
        Asked::Metrics { head_only } => {
            let text = engine.stats_snapshot().to_prometheus_text();
            let length = text.len();
            let body = if head_only { String::new() } else { text };
            (
                "200 OK",
                PROMETHEUS_CONTENT_TYPE,
                format!("Content-Length: {length}\r\n"),
                body,
            )
        }
        other => {
            let (status, message, allow) = match other {
                Asked::WrongMethod => (
                    "405 Method Not Allowed",
                    "use GET /metrics",
                    "Allow: GET, HEAD\r\n",
                ),
                Asked::NotFound => ("404 Not Found", "metrics are at /metrics", ""),
                _ => ("400 Bad Request", "not an HTTP/1.x request", ""),
            };
            let body = format!("segproxy: {message}\n");
            (
                status,
                "text/plain; charset=utf-8",
                format!("{allow}Content-Length: {}\r\n", body.len()),
                body,
            )
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{extra}Connection: close\r\n\r\n{body}"
    );
    if stream.write_all(response.as_bytes()).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::EngineConfig;
    use crate::engine::server::ProxyServer;
    use crate::engine::state::EngineParts;

    #[test]
    fn requests_are_read_with_httparse() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x"), None);
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Asked::Metrics { head_only: false })
        );
        assert_eq!(
            parse(b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n"),
            Some(Asked::Metrics { head_only: false })
        );
        assert_eq!(
            parse(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Some(Asked::Metrics { head_only: true })
        );
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Asked::WrongMethod)
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Some(Asked::NotFound));
        assert_eq!(
            parse(b"GET /metrics/x HTTP/1.1\r\n\r\n"),
            Some(Asked::NotFound)
        );
        assert_eq!(parse(b"\x16\x03\x01\x02\x00"), Some(Asked::Malformed));
    }

    async fn fetch(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr)
            .await
            .expect("metrics port accepts");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("answer in time")
            .unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_are_served_until_shutdown() {
        let config = EngineConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            stats_port: Some(0),
            ..Default::default()
        };
        let server = ProxyServer::bind(config, EngineParts::default())
            .await
            .unwrap();
        let addr = server.engine().stats().metrics_addr().expect("serving");
        assert_eq!(addr.ip(), server.local_addr().ip());
        assert_ne!(addr.port(), server.local_addr().port());
        // A connection to the proxy counts while open.
        let held = TcpStream::connect(server.local_addr()).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while server.engine().active_connections() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never accepted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let ok = fetch(addr, "GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n").await;
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(
            body.lines().any(|l| l == "segproxy_connections_open 1"),
            "{body}"
        );
        assert!(
            body.lines().any(|l| l == "segproxy_connections_total 1"),
            "{body}"
        );

        let head_only = fetch(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head_only.starts_with("HTTP/1.1 200 OK\r\n") && head_only.ends_with("\r\n\r\n"));
        let missing = fetch(addr, "GET /other HTTP/1.1\r\n\r\n").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        let post = fetch(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        let junk = fetch(addr, "\x16\x03\x01junk\r\n\r\n").await;
        assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");

        drop(held);
        server.shutdown(Duration::from_secs(1)).await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "metrics port still open after shutdown"
        );
    }

    #[tokio::test]
    async fn a_busy_stats_port_fails_the_start() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = EngineConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            stats_port: Some(taken.local_addr().unwrap().port()),
            ..Default::default()
        };
        let err = match ProxyServer::bind(config, EngineParts::default()).await {
            Ok(_) => panic!("started on a busy stats port"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("(stats port)"), "{err}");
    }
}
