//! A TCP proxy between client and broker for injecting network faults and checking
//! the order of the client's acknowledgements.
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
//!
//! // Acknowledgement order [MQTT-4.6.0-2/3/4], counted on every relayed connection
//! // (see `acks.rs`): a consumer routed through the proxy for the whole test.
//! assert!(proxy.wait_for_client_acks(100, Duration::from_secs(10)).await);
//! proxy.assert_acks_in_order();
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

use super::acks::{AckReport, ConnectionAcks};

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
    /// Ack-order ledgers of every relayed connection, live or ended, in accept order.
    acks: Mutex<Vec<Arc<Mutex<ConnectionAcks>>>>,
    /// PUBACK, PUBREC and PUBREL packets clients sent, over all connections.
    client_acks: watch::Sender<u64>,
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

    /// Registers the ack ledger of a newly relayed connection.
    fn new_ledger(&self, id: u64) -> Arc<Mutex<ConnectionAcks>> {
        let ledger = Arc::new(Mutex::new(ConnectionAcks::new(id)));
        self.acks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&ledger));
        ledger
    }

    fn ack_report(&self) -> AckReport {
        let ledgers = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
        AckReport::from_connections(ledgers.iter().map(|ledger| lock(ledger).report()).collect())
    }
}

fn lock(ledger: &Mutex<ConnectionAcks>) -> std::sync::MutexGuard<'_, ConnectionAcks> {
    ledger.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ends a connection's ack accounting when its relay task ends or is aborted, so ids
/// still owed at a cut are not taken for violations.
struct LedgerGuard(Arc<Mutex<ConnectionAcks>>);

impl Drop for LedgerGuard {
    fn drop(&mut self) {
        lock(&self.0).close();
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
            // From 1, so the first connection is "conn 1" in ack reports.
            next_id: AtomicU64::new(1),
            cut_next_subscribe: AtomicBool::new(false),
            hold_subscribes: watch::Sender::new(false),
            subscribes_seen: watch::Sender::new(0),
            acks: Mutex::new(Vec::new()),
            client_acks: watch::Sender::new(0),
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

    /// Ack-order accounting over every connection relayed so far, live or ended
    /// [MQTT-4.6.0-2/3/4].
    ///
    /// Only what has passed the proxy is counted: wait for the acks a test expects
    /// ([`wait_for_client_acks`](Proxy::wait_for_client_acks)) before reading it.
    pub(crate) fn ack_report(&self) -> AckReport {
        self.shared.ack_report()
    }

    /// Panics, describing the first violations and the counts, if any client sent a
    /// PUBACK, PUBREC or PUBREL out of order on any connection. Unsolicited acks (for
    /// ids not owed on that connection) do not fail this; read them from
    /// [`ack_report`](Proxy::ack_report).
    #[track_caller]
    pub(crate) fn assert_acks_in_order(&self) {
        let report = self.ack_report();
        assert!(
            report.violations() == 0,
            "acks out of receive order [MQTT-4.6.0-2/3/4]: {}\n{report}",
            report.described_violations().join("; ")
        );
    }

    /// PUBACK, PUBREC and PUBREL packets clients have sent through the proxy so far.
    pub(crate) fn client_acks(&self) -> u64 {
        *self.shared.client_acks.borrow()
    }

    /// Waits until clients have sent at least `n` PUBACK, PUBREC and PUBREL packets in
    /// all; `false` if `timeout` passes first.
    pub(crate) async fn wait_for_client_acks(&self, n: u64, timeout: Duration) -> bool {
        let mut acks = self.shared.client_acks.subscribe();
        tokio::time::timeout(timeout, acks.wait_for(|total| *total >= n))
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
            relay(id, inbound, upstream, mode, faults).await;
        });
        live.insert(id, task);
        shared.live_count.send_replace(live.len());
        drop(live);
    }
}

/// Relays one connection until both directions end or either fails.
async fn relay(
    id: u64,
    inbound: TcpStream,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    shared: Arc<Shared>,
) {
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        // Upstream down: the client sees its connection closed, as with a dead broker.
        return;
    };
    let ledger = shared.new_ledger(id);
    let _closes = LedgerGuard(Arc::clone(&ledger));
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (client_read, client_write) = inbound.into_split();
    let (broker_read, broker_write) = outbound.into_split();
    let _ = tokio::try_join!(
        pump(
            client_read,
            broker_write,
            mode.clone(),
            Side::Client(ClientSide {
                shared,
                ledger: Arc::clone(&ledger),
            })
        ),
        pump(broker_read, client_write, mode, Side::Broker(ledger)),
    );
}

/// Which direction a [`pump`] copies, with what it accounts for there.
enum Side {
    /// Client to broker: acks, and the SUBSCRIBE faults.
    Client(ClientSide),
    /// Broker to client: the PUBLISH and PUBREC packets the client owes acks for.
    Broker(Arc<Mutex<ConnectionAcks>>),
}

/// Copies one direction, holding bytes back while the proxy is stalled. On end of
/// stream the write side is shut down, so half-closes pass through.
///
/// Every chunk is accounted for before it is written, so a PUBLISH is on the books
/// before the client can possibly ack it.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    side: Side,
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
        match &side {
            Side::Broker(ledger) => lock(ledger).broker_sent(chunk),
            Side::Client(client) => {
                if let Some(at) = client.scan(chunk) {
                    to.write_all(&chunk[..at]).await?;
                    chunk = &chunk[at..];
                    client.apply_subscribe_faults().await?;
                }
            }
        }
        to.write_all(chunk).await?;
    }
}

/// The client-to-broker side of a connection: its ack ledger and the proxy's
/// SUBSCRIBE faults.
struct ClientSide {
    shared: Arc<Shared>,
    ledger: Arc<Mutex<ConnectionAcks>>,
}

impl ClientSide {
    /// Accounts for `chunk`; returns the offset of the first SUBSCRIBE packet that
    /// starts in it, if any.
    fn scan(&self, chunk: &[u8]) -> Option<usize> {
        let (subscribes, first, acks) = {
            let mut ledger = lock(&self.ledger);
            let before = ledger.client_acks();
            let (subscribes, first) = ledger.client_sent(chunk);
            (subscribes, first, ledger.client_acks() - before)
        };
        if subscribes > 0 {
            self.shared
                .subscribes_seen
                .send_modify(|seen| *seen += subscribes);
        }
        if acks > 0 {
            self.shared.client_acks.send_modify(|total| *total += acks);
        }
        first
    }

    /// Called before a SUBSCRIBE is relayed: cuts the connection if a cut is
    /// armed (an error ends the relay and drops both sockets), else waits while
    /// SUBSCRIBEs are held.
    async fn apply_subscribe_faults(&self) -> io::Result<()> {
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
