//! A TCP proxy: it forwards bytes both ways between
//! the daemon and one service, and on command cuts every open connection or
//! holds each chunk for a while (delay). Schedules live in the callers
//! (the chaos `proxy` scenario); the proxy itself is deterministic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bytes read and forwarded at a time.
const CHUNK: usize = 32 * 1024;

/// A running proxy; its accept loop ends when it is dropped.
pub struct TcpProxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// Milliseconds each forwarded chunk is held.
    delay_ms: Arc<AtomicU64>,
    /// Bumped to cut every open connection.
    cut: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listen on `listener` and forward each connection to `127.0.0.1:upstream`.
    pub fn start(listener: std::net::TcpListener, upstream: u16) -> Result<TcpProxy> {
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let listener = TcpListener::from_std(listener)?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (cut, _) = watch::channel(0u64);
        let (delay, cuts) = (delay_ms.clone(), cut.clone());
        let accept = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, upstream, delay.clone(), cuts.subscribe()));
            }
        });
        Ok(TcpProxy {
            port,
            delay_ms,
            cut,
            accept,
        })
    }

    /// A proxy on a fresh port of 127.0.0.1 in front of `127.0.0.1:upstream`.
    pub fn to(upstream: u16) -> Result<TcpProxy> {
        TcpProxy::start(std::net::TcpListener::bind("127.0.0.1:0")?, upstream)
    }

    /// Close every open connection (new ones are accepted as before).
    pub fn cut_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// Hold each forwarded chunk for `delay` (zero: forward at once).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn serve(
    client: TcpStream,
    upstream: u16,
    delay: Arc<AtomicU64>,
    mut cut: watch::Receiver<u64>,
) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    cut.borrow_and_update();
    tokio::select! {
        _ = async { tokio::join!(pipe(cr, sw, delay.clone()), pipe(sr, cw, delay)) } => {}
        _ = cut.changed() => {}
    }
}

/// Copy `from` to `to`, holding each chunk for the current delay.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Arc<AtomicU64>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let ms = delay.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cut_closes_open_connections_and_new_ones_still_work() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_port = echo.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = c.read(&mut b).await {
                        if n == 0 || c.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let proxy = TcpProxy::start(listener, echo_port).expect("proxy");
        let mut a = TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .expect("a");
        let mut b = [0u8; 4];
        a.write_all(b"ping").await.expect("write");
        a.read_exact(&mut b).await.expect("echo");
        assert_eq!(&b, b"ping");
        proxy.cut_all();
        let n = tokio::time::timeout(Duration::from_secs(5), a.read(&mut b))
            .await
            .expect("closed in time");
        assert!(matches!(n, Ok(0) | Err(_)), "cut connection must close");
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .expect("c");
        c.write_all(b"pong").await.expect("write");
        c.read_exact(&mut b).await.expect("echo after cut");
        assert_eq!(&b, b"pong");
    }
}
