//! A fast backend for proxy benchmarks. Binds `JUPYTERHUB_SERVICE_URL` (or
//! the first argument, `host:port`) and answers under any prefix:
//! `…/api` (readiness), `…/1k` and `…/1m` (fixed bodies), `…/ws` (WebSocket echo).
#![forbid(unsafe_code)]

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

async fn handle(mut req: Request<Incoming>, k1: Bytes, m1: Bytes) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if path.ends_with("/ws") && req.headers().contains_key(hyper::header::UPGRADE) {
        let key = req.headers().get("sec-websocket-key").cloned();
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(m)) = rx.next().await {
                    if m.is_text() || m.is_binary() {
                        if tx.send(m).await.is_err() {
                            break;
                        }
                    } else if m.is_close() {
                        break;
                    }
                }
            }
        });
        let accept =
            key.map(|k| tokio_tungstenite::tungstenite::handshake::derive_accept_key(k.as_bytes())).unwrap_or_default();
        let resp = Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
        return Ok(resp);
    }
    let body = if path.ends_with("/1m") {
        m1
    } else if path.ends_with("/1k") {
        k1
    } else {
        Bytes::from_static(b"{}")
    };
    Ok(Response::new(Full::new(body)))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = match std::env::args().nth(1) {
        Some(a) => a,
        None => {
            let url = std::env::var("JUPYTERHUB_SERVICE_URL").unwrap_or_else(|_| "http://127.0.0.1:8999/".into());
            url.trim_start_matches("http://").split('/').next().unwrap_or("127.0.0.1:8999").to_string()
        }
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("bench-backend on {addr}");
    let k1 = Bytes::from(vec![b'k'; 1024]);
    let m1 = Bytes::from(vec![b'm'; 1 << 20]);
    loop {
        let (s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        let (k1, m1) = (k1.clone(), m1.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |r| handle(r, k1.clone(), m1.clone()));
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).with_upgrades().await;
        });
    }
}
