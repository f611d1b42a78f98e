//! Listeners: the accept loop (one for berth's port and one for the Docker
//! network's gateway), TLS and plain HTTP on the same port (by the first
//! byte), HTTP/1.1 connections with upgrades, drained on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_proxy::Peer;
use berth_spawner_docker::DockerSpawner;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Shared;

/// Listens on the Docker network's gateway (retrying until the engine
/// answers), then accepts there until shutdown.
pub(crate) async fn gateway_listener(
    d: Arc<DockerSpawner>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    port: u16,
) {
    let mut warned = false;
    loop {
        let attempt = async {
            let gw = d.ensure_network().await.map_err(|e| e.to_string())?;
            let addr: SocketAddr = format!("{gw}:{port}").parse().map_err(|e| format!("gateway {gw}: {e}"))?;
            TcpListener::bind(addr).await.map(|l| (l, addr)).map_err(|e| format!("cannot listen on {addr}: {e}"))
        };
        match attempt.await {
            Ok((listener, addr)) => {
                tracing::info!(%addr, "also listening on the Docker network's gateway for containers");
                return accept_loop(listener, shared, shutdown, tasks, port, true).await;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "containers cannot reach the hub yet; retrying every 5 s");
                    warned = true;
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
        let (shared, stop) = (shared.clone(), shutdown.clone());
        tasks.spawn(async move {
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
    match &shared.tls {
        Some(tls) if berth_proxy::tls::peek_is_tls(&stream).await? => {
            let acceptor = tls.acceptor();
            let stream = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await??;
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
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(crate::edge::handle(shared, req, peer, internal).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        // Bounded buffers keep memory flat with many streaming connections.
        .max_buf_size(64 * 1024)
        .header_read_timeout(Duration::from_secs(30))
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
