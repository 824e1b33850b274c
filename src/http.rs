//! The metrics and health endpoint: `GET /metrics` (Prometheus text format),
//! `GET /health` (the process is alive) and `GET /ready` (by the readiness
//! rule of what the process runs, see [`Readiness`]). A few read-only GET
//! routes on a local address do not need a web framework; each request is
//! read with a size and time limit and answered with `Connection: close`.

use pgcdc_actors::error::ConfigError;
use std::net::SocketAddr;
use std::time::Duration;

use pgcdc_actors::metrics::{metrics, Readiness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::AppError;

/// When `/ready` answers 200.
#[derive(Debug, Clone, Copy)]
pub struct ReadyRule {
    /// What readiness is judged on.
    pub what: Readiness,
    /// How recent progress must be.
    pub window: Duration,
}

/// Bind `addr` and serve until the process ends.
pub async fn serve(addr: SocketAddr, ready: ReadyRule) -> Result<(), AppError> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        AppError::Config(vec![ConfigError::new(
            "metrics.listen",
            format!("cannot bind {addr}: {e}"),
        )])
    })?;
    tracing::info!(%addr, "metrics endpoint listening");
    actix::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    actix::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), answer(conn, ready))
                            .await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn answer(mut conn: TcpStream, ready: ReadyRule) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = route(method, path, ready);
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

fn route(method: &str, path: &str, ready: ReadyRule) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" {
        return ("405 Method Not Allowed", TEXT, "only GET\n".into());
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics().render(),
        ),
        "/health" => ("200 OK", TEXT, "ok\n".into()),
        "/ready" => match metrics().readiness(ready.window, ready.what) {
            Ok(()) => ("200 OK", TEXT, "ready\n".into()),
            Err(why) => (
                "503 Service Unavailable",
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            "404 Not Found",
            TEXT,
            "try /metrics, /health or /ready\n".into(),
        ),
    }
}
