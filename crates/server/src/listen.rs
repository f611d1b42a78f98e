//! Listeners: the accept loop (one for berth's port and one for the Docker
//! network's gateway), TLS and plain HTTP on the same port (by the first
//! byte), HTTP/1.1 connections with upgrades, drained on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_proxy::Peer;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Shared;

/// Listens on the Docker network's gateway (retrying until the engine
/// answers), then accepts there until shutdown.
pub(crate) async fn gateway_listener(
    d: Arc<dyn berth_spawner_docker::HubNetwork>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    port: u16,
    node: bool,
) {
    // Said once per distinct reason: a reason that changes is news.
    let mut last_error = String::new();
    loop {
        let attempt = async {
            let gw = if node {
                match d.node_address().await.map_err(|e| e.to_string())? {
                    Some(a) => a,
                    None => return Err(String::new()),
                }
            } else {
                d.gateway().await.map_err(|e| e.to_string())?
            };
            let addr: SocketAddr = format!("{gw}:{port}").parse().map_err(|e| format!("gateway {gw}: {e}"))?;
            TcpListener::bind(addr).await.map(|l| (l, addr)).map_err(|e| format!("cannot listen on {addr}: {e}"))
        };
        match attempt.await {
            Ok((listener, addr)) => {
                if node {
                    tracing::info!(%addr, "also listening on the hub's swarm address for servers on other nodes");
                } else {
                    tracing::info!(%addr, "also listening on the Docker network's gateway for containers");
                }
                return accept_loop(listener, shared, shutdown, tasks, port, true).await;
            }
            // No such address (not placing servers on other nodes).
            Err(e) if e.is_empty() => return,
            Err(e) => {
                if e != last_error {
                    tracing::warn!(error = %e, "containers cannot reach the hub yet; retrying every 5 s");
                    last_error = e;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Accepts until shutdown. `internal`: the listener for containers (on the
/// Docker gateway), whose hub API calls are served over plain HTTP under TLS.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    port: u16,
    internal: bool,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let slot = match shared.conns.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::warn!(%peer, %why, "connection refused");
                tasks.spawn(refuse(stream, why));
                continue;
            }
        };
        let (shared, stop) = (shared.clone(), shutdown.clone());
        tasks.spawn(async move {
            let _slot = slot;
            if let Err(e) = serve_connection(shared, stream, peer, port, stop, internal).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    local_port: u16,
    stop: CancellationToken,
    internal: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let wait = shared.client_timeout;
    let is_tls = match &shared.tls {
        // A client that connects and sends nothing is dropped at the same time-out.
        Some(_) => tokio::time::timeout(wait, berth_proxy::tls::peek_is_tls(&stream)).await??,
        None => false,
    };
    match &shared.tls {
        Some(tls) if is_tls => {
            let acceptor = tls.acceptor();
            let stream = tokio::time::timeout(wait, acceptor.accept(stream)).await??;
            let p = Peer { addr: peer, tls: true, local_port };
            drive(shared, TokioIo::new(stream), p, stop, internal).await
        }
        _ => {
            let p = Peer { addr: peer, tls: false, local_port };
            drive(shared, TokioIo::new(stream), p, stop, internal).await
        }
    }
}

async fn drive<I>(
    shared: Arc<Shared>,
    io: I,
    peer: Peer,
    stop: CancellationToken,
    internal: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let header_timeout = shared.client_timeout;
    // This connection's own upstream connection, kept between its requests.
    let upstream = Arc::new(berth_proxy::Upstream::default());
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let (shared, upstream) = (shared.clone(), upstream.clone());
        async move { Ok::<_, Infallible>(crate::edge::handle(shared, req, peer, internal, &upstream).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        // Bounded buffers keep memory flat with many streaming connections.
        .max_buf_size(64 * 1024)
        .header_read_timeout(header_timeout)
        .serve_connection(io, svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r?,
        _ = stop.cancelled() => {
            // Finish the request in flight, then close.
            conn.as_mut().graceful_shutdown();
            conn.await?
        }
    }
    Ok(())
}

/// The threads that accept and serve connections on berth's port, each
/// with an event loop of its own (a current-thread runtime), as nginx's
/// workers: a connection, its requests and its upstream connection stay on
/// the thread that accepted it, so nothing is handed between threads per
/// request. Hub pages and the API still run on the hub's runtime
/// (`edge::hub`). The threads share the one listening socket.
pub(crate) struct ConnectionThreads {
    accepting: Vec<tokio::sync::oneshot::Receiver<()>>,
    finish: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ConnectionThreads {
    /// `count` threads (0: one per core) accepting on `listener` until `shutdown`.
    pub(crate) fn start(
        listener: TcpListener,
        count: u32,
        shared: Arc<Shared>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        port: u16,
    ) -> Result<ConnectionThreads, String> {
        let count = match count {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n as usize,
        };
        let listener = listener.into_std().map_err(|e| format!("cannot share the listening socket: {e}"))?;
        let finish = CancellationToken::new();
        let mut accepting = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count {
            let l = listener.try_clone().map_err(|e| format!("cannot share the listening socket: {e}"))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot make a connection thread's runtime: {e}"))?;
            let (done, rx) = tokio::sync::oneshot::channel();
            accepting.push(rx);
            // A token of the thread's own: each connection checks it when
            // polled, and a shared one would be one lock for all threads.
            let shutdown = shutdown.child_token();
            let (shared, tasks, finish) = (shared.clone(), tasks.clone(), finish.clone());
            let span = tracing::Span::current();
            let thread = std::thread::Builder::new()
                .name(format!("berth-conn-{i}"))
                .spawn(move || {
                    let _span = span.entered();
                    runtime.block_on(async move {
                        match TcpListener::from_std(l) {
                            Ok(l) => accept_loop(l, shared, shutdown, tasks, port, false).await,
                            Err(e) => tracing::error!(error = %e, "a connection thread cannot listen"),
                        }
                        let _ = done.send(());
                        // What this thread's connections started (their
                        // upstream connections, upgrades) runs until berth
                        // has drained and stopped.
                        finish.cancelled().await;
                    });
                })
                .map_err(|e| format!("cannot start a connection thread: {e}"))?;
            threads.push(thread);
        }
        tracing::debug!(threads = count, "connection threads accepting");
        Ok(ConnectionThreads { accepting, finish, threads })
    }

    /// Until every thread has stopped accepting (shutdown).
    pub(crate) async fn accepting(&mut self) {
        for rx in self.accepting.drain(..) {
            let _ = rx.await;
        }
    }

    /// Ends the threads (after the connections have drained).
    pub(crate) async fn stop(self) {
        self.finish.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// A connection over a cap: one plain answer, then closed.
async fn refuse(mut stream: TcpStream, why: &'static str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The answer follows the request, as an HTTP client expects (one that
    // is still writing when an early answer arrives reports a broken
    // exchange, not the 503): what the client sends first is read and
    // dropped, waiting a moment at most.
    let mut first = [0u8; 8192];
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut first)).await;
    let body = format!("{{\"status\": 503, \"message\": \"{why}; try again in a moment\"}}");
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 5\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(resp.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Open connections, in total and per source address.
pub(crate) struct Conns {
    max_total: usize,
    max_per_address: usize,
    state: std::sync::Mutex<(usize, std::collections::HashMap<std::net::IpAddr, usize>)>,
}

/// One admitted connection; counted until dropped.
pub(crate) struct Slot {
    conns: Arc<Conns>,
    ip: std::net::IpAddr,
}

impl Conns {
    pub(crate) fn new(max_total: u32, max_per_address: u32) -> Arc<Conns> {
        Arc::new(Conns {
            max_total: max_total.max(1) as usize,
            max_per_address: max_per_address.max(1) as usize,
            state: std::sync::Mutex::new((0, std::collections::HashMap::new())),
        })
    }

    pub(crate) fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Result<Slot, &'static str> {
        let mut g = self.state.lock().map_err(|_| "berth is shutting down")?;
        if g.0 >= self.max_total {
            return Err("berth serves its maximum of connections");
        }
        let mine = g.1.get(&ip).copied().unwrap_or(0);
        if !ip.is_loopback() && mine >= self.max_per_address {
            return Err("too many connections from your address");
        }
        g.0 += 1;
        *g.1.entry(ip).or_insert(0) += 1;
        Ok(Slot { conns: self.clone(), ip })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut g) = self.conns.state.lock() {
            g.0 = g.0.saturating_sub(1);
            if let Some(n) = g.1.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    g.1.remove(&self.ip);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_address_and_in_total() {
        let c = Conns::new(3, 2);
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let s1 = c.admit(a).unwrap();
        let _s2 = c.admit(a).unwrap();
        assert_eq!(c.admit(a).err(), Some("too many connections from your address"));
        let _s3 = c.admit(b).unwrap();
        assert_eq!(c.admit(lo).err(), Some("berth serves its maximum of connections"));
        drop(s1);
        assert!(c.admit(a).is_ok(), "a closed connection frees its place");
        let c = Conns::new(10, 1);
        let _l1 = c.admit(lo).unwrap();
        assert!(c.admit(lo).is_ok(), "loopback is not limited per address");
    }
}
