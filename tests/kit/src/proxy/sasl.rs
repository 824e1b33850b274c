//! A SASL/PLAIN front for a broker without accounts of its own (tansu's
//! memory engine refuses to create users): it answers `SaslHandshake` and
//! `SaslAuthenticate` itself, checks one user name and password, and then
//! copies bytes to the broker. Before a connection has authenticated it
//! forwards `ApiVersions` only; any other request closes the connection, as
//! a broker requiring SASL does, and is counted as refused. So a client
//! that is not configured for SASL fails through it.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Kafka API keys the front handles.
const API_VERSIONS: i16 = 18;
const SASL_HANDSHAKE: i16 = 17;
const SASL_AUTHENTICATE: i16 = 36;
/// Kafka's error codes for the answers.
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const SASL_AUTHENTICATION_FAILED: i16 = 58;
/// A frame larger than this before authentication is not a client's.
const FRAME_MAX: usize = 1 << 20;

/// What the front saw, per connection: the client id and the outcome.
#[derive(Debug, Default, Clone)]
pub struct SaslLog {
    /// Client ids of connections that authenticated.
    pub authenticated: Vec<String>,
    /// Client ids and why, of connections refused or closed before
    /// authenticating.
    pub refused: Vec<(String, String)>,
}

/// A running front; its accept loop ends when it is dropped.
pub struct SaslFront {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    log: Arc<Mutex<SaslLog>>,
    token: Arc<Mutex<Vec<u8>>>,
    /// The copy tasks of authenticated connections.
    open: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl SaslFront {
    /// Listen on `listener`, accept `user` with `password` (PLAIN), forward
    /// to `127.0.0.1:upstream`.
    pub fn start(
        listener: std::net::TcpListener,
        user: &str,
        password: &str,
        upstream: u16,
    ) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let listener = TcpListener::from_std(listener)?;
        let log = Arc::new(Mutex::new(SaslLog::default()));
        let token = Arc::new(Mutex::new(plain_token(user, password)));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (seen, wanted, copies) = (log.clone(), token.clone(), open.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (seen, wanted, copies) = (seen.clone(), wanted.clone(), copies.clone());
                tokio::spawn(async move {
                    let mut client = String::new();
                    let outcome = authenticate(&mut conn, &wanted, upstream, &mut client).await;
                    let mut log = locked(&seen);
                    match outcome {
                        Ok(mut broker) => {
                            log.authenticated.push(client);
                            locked(&copies).push(tokio::spawn(async move {
                                let _ = tokio::io::copy_bidirectional(&mut conn, &mut broker).await;
                            }));
                        }
                        Err(why) => log.refused.push((client, why)),
                    }
                });
            }
        });
        Ok(Self {
            port,
            log,
            token,
            open,
            accept,
        })
    }

    /// Accept only `password` from now on and close every authenticated
    /// connection: as when an account's password is changed and the broker
    /// restarts.
    pub fn change_password(&self, user: &str, password: &str) {
        *locked(&self.token) = plain_token(user, password);
        for copy in locked(&self.open).drain(..) {
            copy.abort();
        }
    }

    /// What it saw so far.
    pub fn log(&self) -> SaslLog {
        locked(&self.log).clone()
    }
}

impl Drop for SaslFront {
    fn drop(&mut self) {
        self.accept.abort();
        for copy in locked(&self.open).drain(..) {
            copy.abort();
        }
    }
}

/// The PLAIN token of `user` and `password`.
fn plain_token(user: &str, password: &str) -> Vec<u8> {
    format!("\0{user}\0{password}").into_bytes()
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One request frame's header fields the front needs, and where its body
/// starts.
struct Request {
    key: i16,
    version: i16,
    correlation: i32,
    client: String,
    body: usize,
}

/// Read one frame (without its length prefix).
async fn frame(conn: &mut TcpStream) -> Result<Vec<u8>, String> {
    let len = conn.read_i32().await.map_err(|e| format!("read: {e}"))?;
    let len = usize::try_from(len).map_err(|_| "negative frame length".to_owned())?;
    if len > FRAME_MAX {
        return Err(format!("frame of {len} bytes before authenticating"));
    }
    let mut buf = vec![0; len];
    conn.read_exact(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    Ok(buf)
}

/// Write `body` as one frame.
async fn send(conn: &mut TcpStream, body: &[u8]) -> Result<(), String> {
    let len = i32::try_from(body.len()).map_err(|_| "frame too long".to_owned())?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    conn.write_all(&out)
        .await
        .map_err(|e| format!("write: {e}"))
}

fn i16_at(b: &[u8], at: usize) -> Result<i16, String> {
    b.get(at..at + 2)
        .map(|s| i16::from_be_bytes([s[0], s[1]]))
        .ok_or_else(|| "short frame".to_owned())
}

fn i32_at(b: &[u8], at: usize) -> Result<i32, String> {
    b.get(at..at + 4)
        .map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| "short frame".to_owned())
}

/// An unsigned varint at `at`: (value, bytes it took).
fn uvarint_at(b: &[u8], at: usize) -> Result<(usize, usize), String> {
    let (mut value, mut shift) = (0usize, 0);
    for (i, byte) in b.iter().skip(at).enumerate().take(5) {
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
        shift += 7;
    }
    Err("bad varint".to_owned())
}

/// Skip a tagged-fields block at `at`; where it ends.
fn skip_tags(b: &[u8], at: usize) -> Result<usize, String> {
    let (count, mut at) = uvarint_at(b, at).map(|(n, used)| (n, at + used))?;
    for _ in 0..count {
        let (_, used) = uvarint_at(b, at)?;
        at += used;
        let (len, used) = uvarint_at(b, at)?;
        at += used + len;
    }
    Ok(at)
}

/// Parse a request header (v1, or v2 for the flexible versions of
/// `SaslAuthenticate`, the only flexible request the front reads).
fn request(b: &[u8]) -> Result<Request, String> {
    let (key, version, correlation) = (i16_at(b, 0)?, i16_at(b, 2)?, i32_at(b, 4)?);
    let len = i16_at(b, 8)?;
    let mut body = 10;
    let mut client = String::new();
    if let Ok(len) = usize::try_from(len) {
        let name = b.get(10..10 + len).ok_or("short client id")?;
        client = String::from_utf8_lossy(name).into_owned();
        body += len;
    }
    if key == SASL_AUTHENTICATE && version >= 2 {
        body = skip_tags(b, body)?;
    }
    Ok(Request {
        key,
        version,
        correlation,
        client,
        body,
    })
}

/// Answer `SaslHandshake` (v0 or v1): PLAIN only.
fn handshake_answer(req: &Request, b: &[u8]) -> Result<(Vec<u8>, bool), String> {
    let len = usize::try_from(i16_at(b, req.body)?).map_err(|_| "null mechanism")?;
    let start = req.body + 2;
    let mechanism = b.get(start..start + len).ok_or("short mechanism")?;
    let plain = mechanism == b"PLAIN";
    let mut out = req.correlation.to_be_bytes().to_vec();
    let error = if plain { 0 } else { UNSUPPORTED_SASL_MECHANISM };
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&1i32.to_be_bytes());
    out.extend_from_slice(&5i16.to_be_bytes());
    out.extend_from_slice(b"PLAIN");
    Ok((out, plain))
}

/// The PLAIN token of a `SaslAuthenticate` request.
fn auth_bytes(req: &Request, b: &[u8]) -> Result<Vec<u8>, String> {
    let (len, start) = if req.version >= 2 {
        let (n, used) = uvarint_at(b, req.body)?;
        (n.checked_sub(1).ok_or("null auth bytes")?, req.body + used)
    } else {
        let n = usize::try_from(i32_at(b, req.body)?).map_err(|_| "null auth bytes")?;
        (n, req.body + 4)
    };
    Ok(b.get(start..start + len)
        .ok_or("short auth bytes")?
        .to_vec())
}

/// Answer a `SaslAuthenticate` request (v0-v2): success, or failure with
/// `message`.
fn authenticate_answer(req: &Request, failure: Option<&str>) -> Vec<u8> {
    let flexible = req.version >= 2;
    let mut out = req.correlation.to_be_bytes().to_vec();
    if flexible {
        out.push(0); // response header tags
    }
    let error = if failure.is_some() {
        SASL_AUTHENTICATION_FAILED
    } else {
        0
    };
    out.extend_from_slice(&error.to_be_bytes());
    match (failure, flexible) {
        (None, true) => out.push(0),
        (None, false) => out.extend_from_slice(&(-1i16).to_be_bytes()),
        (Some(m), true) => {
            out.push(u8::try_from(m.len() + 1).unwrap_or(u8::MAX));
            out.extend_from_slice(m.as_bytes());
        }
        (Some(m), false) => {
            out.extend_from_slice(&i16::try_from(m.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(m.as_bytes());
        }
    }
    if flexible {
        out.push(1); // empty auth bytes
    } else {
        out.extend_from_slice(&0i32.to_be_bytes());
    }
    if req.version >= 1 {
        out.extend_from_slice(&0i64.to_be_bytes()); // no re-authentication
    }
    if flexible {
        out.push(0);
    }
    out
}

/// The handshake: `ApiVersions` forwarded, `SaslHandshake` and
/// `SaslAuthenticate` answered; the broker connection once authenticated.
async fn authenticate(
    conn: &mut TcpStream,
    token: &Mutex<Vec<u8>>,
    upstream: u16,
    client: &mut String,
) -> Result<TcpStream, String> {
    let mut broker = TcpStream::connect(("127.0.0.1", upstream))
        .await
        .map_err(|e| format!("broker: {e}"))?;
    let mut mechanism = false;
    loop {
        let b = frame(conn).await?;
        let req = request(&b)?;
        client.clone_from(&req.client);
        match req.key {
            API_VERSIONS => {
                send(&mut broker, &b).await?;
                let answer = frame(&mut broker).await?;
                send(conn, &answer).await?;
            }
            SASL_HANDSHAKE => {
                let (answer, plain) = handshake_answer(&req, &b)?;
                send(conn, &answer).await?;
                if !plain {
                    return Err("mechanism other than PLAIN".to_owned());
                }
                if req.version == 0 {
                    return Err("SaslHandshake v0 (raw SASL frames) is not served".to_owned());
                }
                mechanism = true;
            }
            SASL_AUTHENTICATE if mechanism => {
                let wanted = locked(token).clone();
                if auth_bytes(&req, &b)? == wanted {
                    send(conn, &authenticate_answer(&req, None)).await?;
                    return Ok(broker);
                }
                let failed = "Authentication failed: Invalid username or password";
                send(conn, &authenticate_answer(&req, Some(failed))).await?;
                return Err("wrong user name or password".to_owned());
            }
            key => return Err(format!("request (api key {key}) before authenticating")),
        }
    }
}
