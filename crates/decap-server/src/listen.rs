//! The accept loops: HTTP/1 over TCP (people, GitHub, tools) and over the
//! build socket (sandboxed builds), with the limits that keep a flood of
//! connections from exhausting the server.
//!
//! * At most `max_connections` at once per listener; past that, new
//!   connections are closed at once (they would otherwise hold descriptors
//!   and memory), so the ones being served keep working.
//! * A connection must send a request's whole header within
//!   `header_timeout`, and an idle keep-alive connection is closed after
//!   the same time: a slow or silent client holds a descriptor for seconds,
//!   not forever.
//! * Request bodies are bounded per route by the handlers (from
//!   `Content-Length` before reading) and in time by
//!   [`crate::limits::body_timeout`].
//! * On shutdown, accepting stops, each connection is asked to close after
//!   its current request (one taken just before, whose request is on its
//!   way, gets it answered), and after `drain` whatever is left is dropped.
//!   Live streams end at once when the server stops
//!   ([`crate::streams`]), so viewers never hold the shutdown up.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

/// How long a connection taken just before a stop may take to send its
/// first request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(1000);

/// Limits of an accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ListenLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time to send a request's header, and to stay idle between requests.
    pub header_timeout: Duration,
    /// How long open connections may finish after shutdown begins.
    pub drain: Duration,
}

impl Default for ListenLimits {
    fn default() -> Self {
        ListenLimits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(5),
        }
    }
}

/// Where a request on the build socket came from: a build, never a local
/// client.
#[derive(Debug, Clone, Copy)]
pub struct FromBuild;

/// A listener the accept loop takes connections from.
pub trait Accept: Send + 'static {
    /// The connection.
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// The next connection, with its peer address for TCP.
    fn accept(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, Option<SocketAddr>)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<(Self::Stream, Option<SocketAddr>)> {
        let (s, peer) = tokio::net::TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, Some(peer)))
    }
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<(Self::Stream, Option<SocketAddr>)> {
        let (s, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((s, None))
    }
}

/// Serves `app` on `listener` until `shutdown` turns true. Requests of a
/// TCP connection carry `ConnectInfo<SocketAddr>`; those of the build
/// socket carry [`FromBuild`] and no address.
pub async fn serve<L: Accept>(
    listener: L,
    app: Router,
    limits: ListenLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was
                // taken: wait a moment rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                max = limits.max_connections,
                "too many connections; closing a new one"
            );
            drop(stream);
            continue;
        };
        let app = app.clone();
        let builder = builder.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Whether a request has come on this connection yet.
            let (asked_tx, mut asked) = watch::channel(false);
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    asked_tx.send_replace(true);
                    match peer {
                        Some(p) => {
                            req.extensions_mut().insert(ConnectInfo(p));
                        }
                        None => {
                            req.extensions_mut().insert(FromBuild);
                        }
                    }
                    let app = app.clone();
                    async move {
                        let resp = app.oneshot(req.map(axum::body::Body::new)).await;
                        Ok::<_, Infallible>(match resp {
                            Ok(r) => r,
                            Err(e) => match e {},
                        })
                    }
                },
            );
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|s| *s) => {}
            }
            // A connection taken just before the stop whose request is
            // still on its way gets that request answered: closing it now
            // would lose the request (a webhook GitHub does not send
            // again). An idle keep-alive connection closes at once.
            if !*asked.borrow() {
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = asked.wait_for(|a| *a) => {}
                    _ = tokio::time::sleep(FIRST_REQUEST_GRACE.min(limits.drain)) => {}
                }
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.drain, conn).await;
        });
    }
    // Open connections finish their requests, up to the drain time.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        limits.drain + Duration::from_millis(200),
        slots.acquire_many(all),
    )
    .await;
}
