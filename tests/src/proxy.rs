//! Fault injection on the network: a TCP proxy that can cut every
//! connection through it and refuse new ones until restored, and a private
//! tansu broker that clients reach only through such a proxy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::PrivateBroker;
use crate::{free_port, Error, Result};

struct Inner {
    upstream: SocketAddr,
    cut: AtomicBool,
    /// Cancelled by `cut()`: every connection opened before it ends.
    live: Mutex<CancellationToken>,
    accepted: AtomicU64,
    dropped: AtomicU64,
}

/// A TCP proxy on a free `127.0.0.1` port forwarding to `upstream`.
///
/// `cut()` resets every open connection (both sides see a connection
/// reset) and resets new ones at once, as a dead link would; `restore()`
/// forwards again. The port stays bound throughout, so nothing else can
/// take it while the link is down.
pub struct Proxy {
    port: u16,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding. Must be called inside a tokio runtime.
    pub fn start(upstream: SocketAddr) -> Result<Proxy> {
        let (listener, port) = listen()?;
        let inner = Arc::new(Inner {
            upstream,
            cut: AtomicBool::new(false),
            live: Mutex::new(CancellationToken::new()),
            accepted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let accept = accept_each(listener, Arc::clone(&inner), serve);
        Ok(Proxy {
            port,
            inner,
            accept,
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, what clients connect to.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Resets every open connection and every new one until `restore`.
    pub fn cut(&self) {
        let live = self.inner.live.lock().expect("proxy lock");
        self.inner.cut.store(true, Ordering::SeqCst);
        live.cancel();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        let mut live = self.inner.live.lock().expect("proxy lock");
        *live = CancellationToken::new();
        self.inner.cut.store(false, Ordering::SeqCst);
    }

    /// Whether it is cut now.
    pub fn is_cut(&self) -> bool {
        self.inner.cut.load(Ordering::SeqCst)
    }

    /// (connections forwarded, connections reset by a cut)
    pub fn counts(&self) -> (u64, u64) {
        (
            self.inner.accepted.load(Ordering::Relaxed),
            self.inner.dropped.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// A listener on a free `127.0.0.1` port, and the port.
pub(crate) fn listen() -> Result<(TcpListener, u16)> {
    let bound = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(|l| Ok((l.local_addr()?.port(), l)))
        .and_then(|(port, l)| Ok((TcpListener::from_std(l)?, port)));
    bound.map_err(|e| Error::io("listen on 127.0.0.1", e))
}

/// Accepts connections on `listener` until aborted, each served by
/// `serve` on a task of its own.
pub(crate) fn accept_each<S, F>(
    listener: TcpListener,
    state: Arc<S>,
    serve: fn(Arc<S>, TcpStream) -> F,
) -> JoinHandle<()>
where
    S: Send + Sync + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(serve(Arc::clone(&state), client));
        }
    })
}

/// Drops `s` with a TCP reset rather than an orderly close.
pub(crate) fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn serve(inner: Arc<Inner>, mut client: TcpStream) {
    let token = inner.live.lock().expect("proxy lock").clone();
    if inner.cut.load(Ordering::SeqCst) || token.is_cancelled() {
        inner.dropped.fetch_add(1, Ordering::Relaxed);
        reset(client);
        return;
    }
    let _ = client.set_nodelay(true);
    let upstream = tokio::select! {
        _ = token.cancelled() => None,
        r = TcpStream::connect(inner.upstream) => r.ok(),
    };
    let Some(mut upstream) = upstream else {
        inner.dropped.fetch_add(1, Ordering::Relaxed);
        reset(client);
        return;
    };
    let _ = upstream.set_nodelay(true);
    inner.accepted.fetch_add(1, Ordering::Relaxed);
    let cut = tokio::select! {
        _ = token.cancelled() => true,
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => false,
    };
    if cut {
        inner.dropped.fetch_add(1, Ordering::Relaxed);
        reset(client);
        reset(upstream);
    }
}

/// A private in-memory tansu broker listening on its own port, advertised
/// to clients at the port of a [`Proxy`] in front of it: every connection
/// of every client goes through the proxy and `cut()` cuts them all.
pub struct ProxiedBroker {
    /// The broker, listening on a port only the proxy connects to.
    pub broker: PrivateBroker,
    /// What every client connects through.
    pub proxy: Proxy,
}

impl ProxiedBroker {
    /// Starts the proxy and the broker and waits until the broker accepts
    /// connections. Blocks: call it inside `block_in_place` on a
    /// multi-threaded runtime.
    pub fn start() -> Result<ProxiedBroker> {
        let broker_port = free_port();
        let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], broker_port)))?;
        let broker = PrivateBroker::start_behind(broker_port, proxy.port())?;
        Ok(ProxiedBroker { broker, proxy })
    }

    /// What clients use as `bootstrap.servers`: the proxy.
    pub fn addr(&self) -> String {
        self.proxy.addr()
    }
}
