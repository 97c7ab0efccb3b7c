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
    pub fn start(upstream: SocketAddr) -> Proxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let port = std_listener.local_addr().expect("proxy addr").port();
        let listener = TcpListener::from_std(std_listener).expect("tokio listener");
        let inner = Arc::new(Inner {
            upstream,
            cut: AtomicBool::new(false),
            live: Mutex::new(CancellationToken::new()),
            accepted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let state = Arc::clone(&inner);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(serve(Arc::clone(&state), client));
            }
        });
        Proxy {
            port,
            inner,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

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

/// Drops `s` with a TCP reset rather than an orderly close.
fn reset(s: TcpStream) {
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
/// to clients at the port of a [`Proxy`] in front of it: librdkafka
/// connects to the advertised address from the metadata, so every
/// connection of every client goes through the proxy and `cut()` cuts them
/// all.
pub struct ProxiedBroker {
    /// The port tansu listens on (only the proxy connects to it).
    pub broker_port: u16,
    pub proxy: Proxy,
    child: Option<std::process::Child>,
}

impl ProxiedBroker {
    /// Must be called inside a (multi-threaded) tokio runtime.
    pub fn start() -> ProxiedBroker {
        let broker_port = super::free_port();
        let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], broker_port)));
        let mut b = ProxiedBroker {
            broker_port,
            proxy,
            child: None,
        };
        b.restart();
        b
    }

    /// What clients use as `bootstrap.servers`: the proxy.
    pub fn addr(&self) -> String {
        self.proxy.addr()
    }

    /// Starts tansu (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Some(super::spawn_tansu(self.broker_port, self.proxy.port()));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ProxiedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
