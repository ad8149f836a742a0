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
//!
//! // Faults aimed at the client's SUBSCRIBE packets (first byte 0x82):
//! proxy.cut_next_subscribe(); // the next connection to send one is cut before it passes
//! proxy.hold_subscribes();    // SUBSCRIBEs (and what follows them) wait at the proxy
//! assert!(proxy.wait_for_subscribes_seen(1, Duration::from_secs(10)).await);
//! proxy.release_subscribes();
//! ```
//!
//! Dropping the proxy aborts its accept loop and every relay task.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Cut the next connection that sends a SUBSCRIBE, before the packet passes.
    cut_next_subscribe: AtomicBool,
    /// While true, a SUBSCRIBE and everything after it on its connection wait.
    hold_subscribes: watch::Sender<bool>,
    /// SUBSCRIBE packets clients sent through the proxy (cut, held or relayed).
    subscribes_seen: watch::Sender<usize>,
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
            cut_next_subscribe: AtomicBool::new(false),
            hold_subscribes: watch::Sender::new(false),
            subscribes_seen: watch::Sender::new(0),
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

    /// Arms a one-shot fault: the next connection on which the client sends a
    /// SUBSCRIBE packet is closed (both directions) before that packet reaches the
    /// broker. Bytes before it are relayed. Later connections are left alone.
    pub(crate) fn cut_next_subscribe(&self) {
        self.shared.cut_next_subscribe.store(true, Ordering::SeqCst);
    }

    /// Whether an armed [`cut_next_subscribe`](Proxy::cut_next_subscribe) has fired.
    pub(crate) fn subscribe_cut_done(&self) -> bool {
        !self.shared.cut_next_subscribe.load(Ordering::SeqCst)
    }

    /// Holds every SUBSCRIBE packet a client sends (and whatever the client sends
    /// after it on that connection) at the proxy until
    /// [`release_subscribes`](Proxy::release_subscribes), so the broker never
    /// answers with a SUBACK meanwhile. Bytes before the SUBSCRIBE are relayed.
    pub(crate) fn hold_subscribes(&self) {
        self.shared.hold_subscribes.send_replace(true);
    }

    /// Lets held SUBSCRIBE packets through, and new ones pass again.
    pub(crate) fn release_subscribes(&self) {
        self.shared.hold_subscribes.send_replace(false);
    }

    /// SUBSCRIBE packets clients have sent into the proxy so far (relayed, held or
    /// cut).
    pub(crate) fn subscribes_seen(&self) -> usize {
        *self.shared.subscribes_seen.borrow()
    }

    /// Waits until clients have sent at least `n` SUBSCRIBE packets; `false` if
    /// `timeout` passes first.
    pub(crate) async fn wait_for_subscribes_seen(&self, n: usize, timeout: Duration) -> bool {
        let mut seen = self.shared.subscribes_seen.subscribe();
        tokio::time::timeout(timeout, seen.wait_for(|total| *total >= n))
            .await
            .is_ok_and(|changed| changed.is_ok())
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
        let faults = Arc::clone(&shared);
        // Hold the lock across spawn and insert, so a relay that ends at once cannot
        // unregister itself before it is registered.
        let mut live = shared.live();
        let task = tokio::spawn(async move {
            let _guard = guard;
            relay(inbound, upstream, mode, faults).await;
        });
        live.insert(id, task);
        shared.live_count.send_replace(live.len());
        drop(live);
    }
}

/// Relays one connection until both directions end or either fails.
async fn relay(
    inbound: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    shared: Arc<Shared>,
) {
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        // Upstream down: the client sees its connection closed, as with a dead broker.
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (client_read, client_write) = inbound.into_split();
    let (broker_read, broker_write) = outbound.into_split();
    let _ = tokio::try_join!(
        pump(
            client_read,
            broker_write,
            mode.clone(),
            Some(SubscribeFaults::new(shared))
        ),
        pump(broker_read, client_write, mode, None),
    );
}

/// Copies one direction, holding bytes back while the proxy is stalled. On end of
/// stream the write side is shut down, so half-closes pass through.
///
/// `subscribes` is given for the client-to-broker direction only: it finds
/// SUBSCRIBE packets in the byte stream and applies the SUBSCRIBE faults.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    mut subscribes: Option<SubscribeFaults>,
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
        let mut chunk = &buf[..n];
        if let Some(faults) = &mut subscribes {
            if let Some(at) = faults.scan(chunk) {
                to.write_all(&chunk[..at]).await?;
                chunk = &chunk[at..];
                faults.apply().await?;
            }
        }
        to.write_all(chunk).await?;
    }
}

/// The first byte of an MQTT 3.1.1 SUBSCRIBE packet (type 8, flags 0b0010).
const SUBSCRIBE: u8 = 0x82;

/// Finds SUBSCRIBE packets in the client's byte stream and applies the proxy's
/// SUBSCRIBE faults to them.
struct SubscribeFaults {
    shared: Arc<Shared>,
    framing: Framing,
}

/// Where the scanner is in the MQTT framing: a fixed-header byte, the
/// variable-length "remaining length", or the rest of a packet.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Header,
    Length { value: usize, shift: u32 },
    Body(usize),
}

impl SubscribeFaults {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            framing: Framing::Header,
        }
    }

    /// Scans `chunk`, counting the SUBSCRIBE packets that start in it; returns
    /// the offset of the first one, if any. The framing state carries over
    /// between chunks.
    fn scan(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut first = None;
        let mut i = 0;
        while i < chunk.len() {
            match self.framing {
                Framing::Header => {
                    if chunk[i] == SUBSCRIBE {
                        first.get_or_insert(i);
                        self.shared.subscribes_seen.send_modify(|seen| *seen += 1);
                    }
                    self.framing = Framing::Length { value: 0, shift: 0 };
                    i += 1;
                }
                Framing::Length { value, shift } => {
                    let byte = chunk[i];
                    let value = value | (usize::from(byte & 0x7f) << shift);
                    self.framing = if byte & 0x80 != 0 {
                        Framing::Length {
                            value,
                            shift: shift + 7,
                        }
                    } else if value == 0 {
                        Framing::Header
                    } else {
                        Framing::Body(value)
                    };
                    i += 1;
                }
                Framing::Body(remaining) => {
                    let take = remaining.min(chunk.len() - i);
                    i += take;
                    self.framing = if take == remaining {
                        Framing::Header
                    } else {
                        Framing::Body(remaining - take)
                    };
                }
            }
        }
        first
    }

    /// Called before a SUBSCRIBE is relayed: cuts the connection if a cut is
    /// armed (an error ends the relay and drops both sockets), else waits while
    /// SUBSCRIBEs are held.
    async fn apply(&self) -> io::Result<()> {
        if self.shared.cut_next_subscribe.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("proxy: cut at the client's SUBSCRIBE"));
        }
        let mut held = self.shared.hold_subscribes.subscribe();
        let released = held.wait_for(|held| !*held).await.is_ok();
        if released {
            Ok(())
        } else {
            Err(io::Error::other("proxy dropped"))
        }
    }
}

async fn wait_unstalled(mode: &mut watch::Receiver<Mode>) -> io::Result<()> {
    match mode.wait_for(|mode| *mode != Mode::Stall).await {
        Ok(_) => Ok(()),
        Err(_) => Err(io::Error::other("proxy dropped")),
    }
}
