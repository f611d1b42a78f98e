//! WebSocket round-trip latency: `ws-rtt URL COUNT [HEADER: VALUE]...`
//! Sends COUNT small text messages one at a time and prints p50/p99 in µs.
#![forbid(unsafe_code)]
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark tool: a failed expect is a failed run

use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("usage: ws-rtt URL COUNT [HEADER: VALUE]...");
    let count: usize = args.next().and_then(|c| c.parse().ok()).unwrap_or(10_000).clamp(1, 1_000_000);
    let mut req = url.into_client_request().expect("url");
    for h in args {
        if let Some((k, v)) = h.split_once(':') {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.trim().as_bytes()).expect("header"),
                v.trim().parse().expect("value"),
            );
        }
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("connect");
    let mut samples = Vec::with_capacity(count);
    let msg = "x".repeat(32);
    // Warm-up.
    for _ in 0..200.min(count) {
        ws.send(Message::Text(msg.clone())).await.expect("send");
        ws.next().await.expect("echo").expect("echo");
    }
    for _ in 0..count {
        let t = Instant::now();
        ws.send(Message::Text(msg.clone())).await.expect("send");
        ws.next().await.expect("echo").expect("echo");
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)] as f64 / 1000.0;
    println!("count={count} p50_us={:.1} p99_us={:.1}", pct(0.50), pct(0.99));
}
