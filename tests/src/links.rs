//! A private tansu broker that every Kafka client reaches over a network
//! link of its own, so that a test can cut one engine node off the broker
//! while another node (and the test's consumer) keeps its connection.
//!
//! A plain [`crate::proxy::Proxy`] per node cannot do this: librdkafka
//! connects to the address the broker advertises in its metadata, and a
//! broker advertises one address, so every client ends up on the same
//! proxy. Here the broker advertises a router, and the router tells clients
//! apart by the `client.id` in the header of the first request of each
//! connection (the Kafka request header keeps `client_id` as a plain
//! nullable string in every version). Connections of a client id with a
//! link go through that link; all others go straight to the broker.
//!
//! A link can be cut (every connection reset, new ones reset at once, as a
//! dead network would) or held: requests stop reaching the broker while its
//! responses still come back, so a client learns the fate of everything the
//! broker wrote, and nothing it sends afterwards is written.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::PrivateBroker;
use crate::proxy::{accept_each, listen, reset};
use crate::{free_port, Result};

/// How long a new connection may take to send its first request header.
const HEADER_WAIT: Duration = Duration::from_secs(10);

struct LinkState {
    cut: AtomicBool,
    /// Cancelled by `cut()`: every connection opened before it ends.
    live: Mutex<CancellationToken>,
    /// While true, nothing the client sends is forwarded.
    held: watch::Sender<bool>,
    forwarded: AtomicU64,
    reset: AtomicU64,
}

/// The link of one client id; cheap to clone.
#[derive(Clone)]
pub struct Link(Arc<LinkState>);

impl Link {
    fn new() -> Link {
        Link(Arc::new(LinkState {
            cut: AtomicBool::new(false),
            live: Mutex::new(CancellationToken::new()),
            held: watch::Sender::new(false),
            forwarded: AtomicU64::new(0),
            reset: AtomicU64::new(0),
        }))
    }

    /// Stops forwarding what the client sends (a request partly forwarded
    /// stays incomplete, so the broker never acts on it); the broker's
    /// responses still reach the client.
    pub fn hold(&self) {
        self.0.held.send_replace(true);
    }

    /// Resets every open connection of the link, and every new one until
    /// `restore`.
    pub fn cut(&self) {
        let live = self.0.live.lock().expect("link lock");
        self.0.cut.store(true, Ordering::SeqCst);
        live.cancel();
    }

    /// Forwards new connections again (and ends a hold).
    pub fn restore(&self) {
        let mut live = self.0.live.lock().expect("link lock");
        *live = CancellationToken::new();
        self.0.cut.store(false, Ordering::SeqCst);
        self.0.held.send_replace(false);
    }

    /// (connections forwarded, connections reset by a cut)
    pub fn counts(&self) -> (u64, u64) {
        (
            self.0.forwarded.load(Ordering::Relaxed),
            self.0.reset.load(Ordering::Relaxed),
        )
    }
}

struct Router {
    broker: SocketAddr,
    links: HashMap<String, Link>,
}

/// A private in-memory tansu that advertises the router in front of it;
/// each client id of `start` gets its own [`Link`].
pub struct LinkedBroker {
    /// Listens on a port of its own; only the router connects to it.
    pub broker: PrivateBroker,
    router_port: u16,
    router: Arc<Router>,
    accept: JoinHandle<()>,
}

impl LinkedBroker {
    /// Starts the router and the broker and waits until the broker accepts
    /// connections. Blocks: call it inside `block_in_place` on a
    /// multi-threaded runtime.
    pub fn start(client_ids: &[&str]) -> Result<LinkedBroker> {
        let broker_port = free_port();
        let (listener, router_port) = listen()?;
        let router = Arc::new(Router {
            broker: SocketAddr::from(([127, 0, 0, 1], broker_port)),
            links: client_ids
                .iter()
                .map(|id| (id.to_string(), Link::new()))
                .collect(),
        });
        let accept = accept_each(listener, Arc::clone(&router), serve);
        let broker = match PrivateBroker::start_behind(broker_port, router_port) {
            Ok(broker) => broker,
            Err(e) => {
                accept.abort();
                return Err(e);
            }
        };
        Ok(LinkedBroker {
            broker,
            router_port,
            router,
            accept,
        })
    }

    /// What every client uses as `bootstrap.servers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.router_port)
    }

    /// The link of `client_id` (one given to `start`).
    pub fn link(&self, client_id: &str) -> Link {
        self.router
            .links
            .get(client_id)
            .cloned()
            .unwrap_or_else(|| panic!("no link for client id {client_id}"))
    }
}

impl Drop for LinkedBroker {
    fn drop(&mut self) {
        for link in self.router.links.values() {
            link.cut();
        }
        self.accept.abort();
    }
}

/// Reads from `s` into `buf` until it holds at least `n` bytes.
async fn read_at_least(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    while buf.len() < n {
        let k = s.read(&mut chunk).await?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..k]);
    }
    Ok(())
}

/// The client id of the first request on `s`; what was read stays in `head`
/// to be forwarded. Header: size i32, api_key i16, api_version i16,
/// correlation_id i32, client_id (i16 length, -1 for null, then bytes).
async fn read_client_id(s: &mut TcpStream, head: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    read_at_least(s, head, 14).await?;
    let len = i16::from_be_bytes([head[12], head[13]]);
    if len < 0 {
        return Ok(None);
    }
    let end = 14 + len as usize;
    read_at_least(s, head, end).await?;
    Ok(Some(String::from_utf8_lossy(&head[14..end]).into_owned()))
}

async fn serve(router: Arc<Router>, mut client: TcpStream) {
    let _ = client.set_nodelay(true);
    let mut head = Vec::with_capacity(256);
    let id = match tokio::time::timeout(HEADER_WAIT, read_client_id(&mut client, &mut head)).await {
        Ok(Ok(id)) => id,
        _ => {
            reset(client);
            return;
        }
    };
    let link = id.and_then(|id| router.links.get(&id).cloned());
    let (token, held) = match &link {
        Some(l) => {
            let token = l.0.live.lock().expect("link lock").clone();
            if l.0.cut.load(Ordering::SeqCst) || token.is_cancelled() {
                l.0.reset.fetch_add(1, Ordering::Relaxed);
                reset(client);
                return;
            }
            (token, Some(l.0.held.subscribe()))
        }
        None => (CancellationToken::new(), None),
    };
    let upstream = tokio::select! {
        _ = token.cancelled() => None,
        r = TcpStream::connect(router.broker) => r.ok(),
    };
    let Some(mut upstream) = upstream else {
        if let Some(l) = &link {
            l.0.reset.fetch_add(1, Ordering::Relaxed);
        }
        reset(client);
        return;
    };
    let _ = upstream.set_nodelay(true);
    if let Some(l) = &link {
        l.0.forwarded.fetch_add(1, Ordering::Relaxed);
    }
    let cut = {
        let (mut from_client, mut to_client) = client.split();
        let (mut from_broker, mut to_broker) = upstream.split();
        let requests = async {
            let mut held = held;
            let mut pending = head;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if let Some(h) = held.as_mut() {
                    // Checked after every read too: what was read while the
                    // link is held waits here, unforwarded.
                    h.wait_for(|held| !*held).await.map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::BrokenPipe, "link gone")
                    })?;
                }
                if !pending.is_empty() {
                    to_broker.write_all(&pending).await?;
                    pending.clear();
                }
                let n = from_client.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                pending.extend_from_slice(&buf[..n]);
            }
        };
        let responses = tokio::io::copy(&mut from_broker, &mut to_client);
        tokio::select! {
            _ = token.cancelled() => true,
            _ = requests => false,
            _ = responses => false,
        }
    };
    if cut {
        if let Some(l) = &link {
            l.0.reset.fetch_add(1, Ordering::Relaxed);
        }
        reset(client);
        reset(upstream);
    }
}
