//! A TCP proxy between client and broker for injecting network faults.
//!
//! The client connects to [`Proxy::url`]; every accepted connection is relayed to the
//! upstream broker until the test cuts, stalls or refuses it.
//!
//! ```ignore
//! let broker = Mosquitto::start().await;
//! let proxy = Proxy::start(broker.addr()).await;
//! // ... connect the client under test to proxy.url() ...
//! proxy.cut().await;  // every live connection closed (FIN) in both directions
//! proxy.refuse();     // reconnects are accepted and dropped at once
//! proxy.resume();     // back to relaying
//! assert!(proxy.wait_for_connections(1, Duration::from_secs(10)).await);
//! ```
//!
//! Dropping the proxy aborts its accept loop and every relay task.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with bytes and connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Relay bytes both ways.
    Forward,
    /// Keep connections open but relay nothing.
    Stall,
    /// Drop new connections as soon as they are accepted.
    Refuse,
}

/// A fault-injecting TCP proxy on a free loopback port.
pub(crate) struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

struct Shared {
    mode: watch::Sender<Mode>,
    /// Relay tasks of live connections, by connection id.
    live: Mutex<HashMap<u64, JoinHandle<()>>>,
    live_count: watch::Sender<usize>,
    accepted: watch::Sender<usize>,
    next_id: AtomicU64,
}

impl Shared {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, JoinHandle<()>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes the relay tasks of all live connections, leaving new ones alone.
    fn take_live(&self) -> Vec<JoinHandle<()>> {
        let mut live = self.live();
        let tasks = live.drain().map(|(_, task)| task).collect();
        self.live_count.send_replace(live.len());
        tasks
    }
}

/// Unregisters a connection when its relay task ends or is dropped.
struct LiveGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut live = self.shared.live();
        live.remove(&self.id);
        self.shared.live_count.send_replace(live.len());
    }
}

impl Proxy {
    /// Starts relaying connections made to a free 127.0.0.1 port to `upstream`.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub(crate) async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy local address");
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(Mode::Forward),
            live: Mutex::new(HashMap::new()),
            live_count: watch::Sender::new(0),
            accepted: watch::Sender::new(0),
            next_id: AtomicU64::new(0),
        });
        let acceptor = tokio::spawn(accept_loop(listener, upstream, Arc::clone(&shared)));
        Proxy {
            addr,
            upstream,
            shared,
            acceptor,
        }
    }

    /// `mqtt://127.0.0.1:<port>` of the proxy.
    pub(crate) fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// The proxy's port.
    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The proxy's listening address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where connections are relayed to.
    pub(crate) fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Closes every live connection, both directions, and returns once they are closed.
    /// New connections are still accepted (in whatever mode the proxy is in).
    ///
    /// The proxy's sockets are dropped, so both peers see an orderly close (FIN) or a
    /// reset if bytes were still unread.
    pub(crate) async fn cut(&self) {
        let tasks = self.shared.take_live();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // A cancelled task has dropped its sockets once its handle resolves.
            let _ = task.await;
        }
    }

    /// Stops relaying bytes in both directions on every connection, live and new, until
    /// [`resume`](Proxy::resume). Connections stay open; a write already under way
    /// finishes.
    pub(crate) fn stall(&self) {
        self.shared.mode.send_replace(Mode::Stall);
    }

    /// Makes new connections close immediately after being accepted, until
    /// [`resume`](Proxy::resume). Live connections are not touched (see
    /// [`cut`](Proxy::cut)).
    pub(crate) fn refuse(&self) {
        self.shared.mode.send_replace(Mode::Refuse);
    }

    /// Back to relaying: ends a stall or a refusal.
    pub(crate) fn resume(&self) {
        self.shared.mode.send_replace(Mode::Forward);
    }

    /// Live relayed connections.
    pub(crate) fn connections(&self) -> usize {
        *self.shared.live_count.borrow()
    }

    /// Connections accepted so far, including refused ones and ones whose upstream
    /// connect failed: one per connect attempt of the client.
    pub(crate) fn total_accepted(&self) -> usize {
        *self.shared.accepted.borrow()
    }

    /// Waits until exactly `n` connections are live; `false` if `timeout` passes first.
    pub(crate) async fn wait_for_connections(&self, n: usize, timeout: Duration) -> bool {
        let mut count = self.shared.live_count.subscribe();
        tokio::time::timeout(timeout, count.wait_for(|live| *live == n))
            .await
            .is_ok_and(|changed| changed.is_ok())
    }

    /// Waits until at least `n` connections have been accepted in total; `false` if
    /// `timeout` passes first.
    pub(crate) async fn wait_for_accepted(&self, n: usize, timeout: Duration) -> bool {
        let mut accepted = self.shared.accepted.subscribe();
        tokio::time::timeout(timeout, accepted.wait_for(|total| *total >= n))
            .await
            .is_ok_and(|changed| changed.is_ok())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        for task in self.shared.take_live() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("mode", &*self.shared.mode.borrow())
            .field("connections", &self.connections())
            .field("total_accepted", &self.total_accepted())
            .finish_non_exhaustive()
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                // Out of descriptors and the like: back off instead of spinning.
                eprintln!("proxy: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.accepted.send_modify(|total| *total += 1);
        if *shared.mode.borrow() == Mode::Refuse {
            drop(inbound);
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let guard = LiveGuard {
            shared: Arc::clone(&shared),
            id,
        };
        let mode = shared.mode.subscribe();
        // Hold the lock across spawn and insert, so a relay that ends at once cannot
        // unregister itself before it is registered.
        let mut live = shared.live();
        let task = tokio::spawn(async move {
            let _guard = guard;
            relay(inbound, upstream, mode).await;
        });
        live.insert(id, task);
        shared.live_count.send_replace(live.len());
        drop(live);
    }
}

/// Relays one connection until both directions end or either fails.
async fn relay(inbound: TcpStream, upstream: SocketAddr, mode: watch::Receiver<Mode>) {
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        // Upstream down: the client sees its connection closed, as with a dead broker.
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (client_read, client_write) = inbound.into_split();
    let (broker_read, broker_write) = outbound.into_split();
    let _ = tokio::try_join!(
        pump(client_read, broker_write, mode.clone()),
        pump(broker_read, client_write, mode),
    );
}

/// Copies one direction, holding bytes back while the proxy is stalled. On end of
/// stream the write side is shut down, so half-closes pass through.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) -> io::Result<()> {
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        wait_unstalled(&mut mode).await?;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        // A stall that began while this read was pending holds these bytes too.
        wait_unstalled(&mut mode).await?;
        to.write_all(&buf[..n]).await?;
    }
}

async fn wait_unstalled(mode: &mut watch::Receiver<Mode>) -> io::Result<()> {
    match mode.wait_for(|mode| *mode != Mode::Stall).await {
        Ok(_) => Ok(()),
        Err(_) => Err(io::Error::other("proxy dropped")),
    }
}
