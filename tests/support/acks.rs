//! Acknowledgement-order accounting for one MQTT connection, from its raw bytes.
//!
//! MQTT 3.1.1 section 4.6 (kept by MQTT 5) says the client MUST send
//! - PUBACKs in the order the QoS 1 PUBLISH packets were received [MQTT-4.6.0-2],
//! - PUBRECs in the order the QoS 2 PUBLISH packets were received [MQTT-4.6.0-3],
//! - PUBRELs in the order the PUBRECs were received [MQTT-4.6.0-4].
//!
//! [`ConnectionAcks`] reads both directions of one connection (the [`Proxy`] feeds it
//! every chunk it relays) and keeps, per rule, the ids the client still owes an ack
//! for, in receive order. An ack for the head is in order; an ack for an id further
//! back is a *violation* (the id is dropped from the queue, the head stays); an ack for
//! an id that is not owed on this connection is *unsolicited* (a stale ack from an
//! earlier connection, or a duplicate). rumqttd closes the connection on the first
//! violation ("out of order ack"); mosquitto and aedes let it pass, so a test that
//! needs to see violations counted should run against one of those.
//!
//! Ids still owed when the connection ends are not violations: a cut or a broker
//! restart ends the accounting, and a redelivery on the next connection starts a new
//! queue.
//!
//! The bytes are read by the framing scanner in `frames.rs`, which never copies a
//! payload and keeps its state across chunks (a packet may be split anywhere).
//!
//! ```ignore
//! let proxy = Proxy::start(broker.addr()).await;
//! // ... consumer with manual acks connected to proxy.url() for the whole test ...
//! assert!(proxy.wait_for_client_acks(100, WAIT).await);
//! proxy.assert_acks_in_order();
//! let report = proxy.ack_report();
//! assert_eq!(report.totals.publishes_to_client[1], 100);
//! ```
//!
//! [`Proxy`]: super::Proxy

use std::collections::{HashMap, VecDeque};
use std::fmt;

use super::frames::{Ack, Frame, Scanner};

/// How many violations of each kind a connection describes in words (the counts are
/// complete).
const DESCRIBED_PER_KIND: u64 = 4;

/// The three ordering rules of section 4.6, named by the ack the client sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum AckKind {
    /// PUBACK for a QoS 1 PUBLISH [MQTT-4.6.0-2].
    Puback,
    /// PUBREC for a QoS 2 PUBLISH [MQTT-4.6.0-3].
    Pubrec,
    /// PUBREL for a PUBREC the broker sent [MQTT-4.6.0-4].
    Pubrel,
}

impl AckKind {
    const ALL: [AckKind; 3] = [AckKind::Puback, AckKind::Pubrec, AckKind::Pubrel];

    fn index(self) -> usize {
        match self {
            AckKind::Puback => 0,
            AckKind::Pubrec => 1,
            AckKind::Pubrel => 2,
        }
    }

    /// The packet name, as in the specification.
    pub(crate) fn name(self) -> &'static str {
        match self {
            AckKind::Puback => "PUBACK",
            AckKind::Pubrec => "PUBREC",
            AckKind::Pubrel => "PUBREL",
        }
    }
}

/// A count per [`AckKind`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PerKind {
    /// PUBACK.
    pub(crate) puback: u64,
    /// PUBREC.
    pub(crate) pubrec: u64,
    /// PUBREL.
    pub(crate) pubrel: u64,
}

impl PerKind {
    fn get_mut(&mut self, kind: AckKind) -> &mut u64 {
        match kind {
            AckKind::Puback => &mut self.puback,
            AckKind::Pubrec => &mut self.pubrec,
            AckKind::Pubrel => &mut self.pubrel,
        }
    }

    /// The count for `kind`.
    pub(crate) fn get(self, kind: AckKind) -> u64 {
        match kind {
            AckKind::Puback => self.puback,
            AckKind::Pubrec => self.pubrec,
            AckKind::Pubrel => self.pubrel,
        }
    }

    /// All three added up.
    pub(crate) fn total(self) -> u64 {
        self.puback + self.pubrec + self.pubrel
    }

    fn add(&mut self, other: PerKind) {
        self.puback += other.puback;
        self.pubrec += other.pubrec;
        self.pubrel += other.pubrel;
    }
}

/// What the checker counted, for one connection or summed over all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct AckTally {
    /// PUBLISH packets the broker sent the client, by QoS (index 0, 1, 2).
    pub(crate) publishes_to_client: [u64; 3],
    /// PUBLISH packets the client sent the broker, by QoS.
    pub(crate) publishes_from_client: [u64; 3],
    /// PUBACK, PUBREC and PUBREL packets the client sent.
    pub(crate) client_acks: PerKind,
    /// PUBCOMP packets the client sent (their order is not ruled by section 4.6).
    pub(crate) client_pubcomps: u64,
    /// PUBACK, PUBREC and PUBREL packets the broker sent.
    pub(crate) broker_acks: PerKind,
    /// PUBCOMP packets the broker sent.
    pub(crate) broker_pubcomps: u64,
    /// Client acks for an id that was owed but not at the head of its queue.
    pub(crate) violations: PerKind,
    /// Client acks for an id not owed on this connection.
    pub(crate) unsolicited: PerKind,
    /// Ids the client still owes an ack for (for a closed connection: owed when it
    /// ended, which is not a violation).
    pub(crate) outstanding: PerKind,
    /// QoS 1 or 2 PUBLISH packets the broker sent with an id still owed on this connection
    /// (a resend on the same connection); the id keeps its place in the queue.
    pub(crate) repeated_publishes: u64,
    /// Directions whose framing could not be followed (the scanner stopped there).
    pub(crate) framing_errors: u64,
}

impl AckTally {
    fn add(&mut self, other: &AckTally) {
        for qos in 0..3 {
            self.publishes_to_client[qos] += other.publishes_to_client[qos];
            self.publishes_from_client[qos] += other.publishes_from_client[qos];
        }
        self.client_acks.add(other.client_acks);
        self.client_pubcomps += other.client_pubcomps;
        self.broker_acks.add(other.broker_acks);
        self.broker_pubcomps += other.broker_pubcomps;
        self.violations.add(other.violations);
        self.unsolicited.add(other.unsolicited);
        self.outstanding.add(other.outstanding);
        self.repeated_publishes += other.repeated_publishes;
        self.framing_errors += other.framing_errors;
    }
}

/// One connection's part of an [`AckReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConnectionReport {
    /// The proxy's number for the connection (1 for the first one accepted).
    pub(crate) id: u64,
    /// The protocol level from the client's CONNECT (4 = 3.1.1, 5 = MQTT 5), if seen.
    pub(crate) protocol_level: Option<u8>,
    /// Whether the connection is still relayed.
    pub(crate) open: bool,
    /// Its counts.
    pub(crate) tally: AckTally,
    /// The first few violations of each kind in words, like
    /// `"conn 2: PUBACK 29 while 27 was head"`.
    pub(crate) described: Vec<String>,
}

/// Ack-order accounting over every connection a [`Proxy`](super::Proxy) relayed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AckReport {
    /// Sums over all connections.
    pub(crate) totals: AckTally,
    /// Per connection, in the order they were accepted.
    pub(crate) connections: Vec<ConnectionReport>,
}

impl AckReport {
    /// Builds a report from per-connection reports.
    pub(crate) fn from_connections(connections: Vec<ConnectionReport>) -> AckReport {
        let mut totals = AckTally::default();
        for connection in &connections {
            totals.add(&connection.tally);
        }
        AckReport {
            totals,
            connections,
        }
    }

    /// All violations, of every kind, on every connection.
    pub(crate) fn violations(&self) -> u64 {
        self.totals.violations.total()
    }

    /// All unsolicited acks.
    pub(crate) fn unsolicited(&self) -> u64 {
        self.totals.unsolicited.total()
    }

    /// The first violations in words, across connections.
    pub(crate) fn described_violations(&self) -> Vec<&str> {
        self.connections
            .iter()
            .flat_map(|connection| connection.described.iter().map(String::as_str))
            .collect()
    }
}

impl fmt::Display for AckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        writeln!(
            f,
            "{} connection(s); to client PUBLISH qos0/1/2 = {}/{}/{}; client sent \
             PUBACK {} PUBREC {} PUBREL {} PUBCOMP {}; violations PUBACK {} PUBREC {} \
             PUBREL {}; unsolicited PUBACK {} PUBREC {} PUBREL {}; framing errors {}",
            self.connections.len(),
            t.publishes_to_client[0],
            t.publishes_to_client[1],
            t.publishes_to_client[2],
            t.client_acks.puback,
            t.client_acks.pubrec,
            t.client_acks.pubrel,
            t.client_pubcomps,
            t.violations.puback,
            t.violations.pubrec,
            t.violations.pubrel,
            t.unsolicited.puback,
            t.unsolicited.pubrec,
            t.unsolicited.pubrel,
            t.framing_errors,
        )?;
        for connection in &self.connections {
            let c = &connection.tally;
            writeln!(
                f,
                "  conn {} ({}, level {}): to client qos1 {} qos2 {}; client acks {}/{}/{}; \
                 violations {}; unsolicited {}; owed {}",
                connection.id,
                if connection.open { "open" } else { "closed" },
                connection
                    .protocol_level
                    .map_or_else(|| String::from("?"), |level| level.to_string()),
                c.publishes_to_client[1],
                c.publishes_to_client[2],
                c.client_acks.puback,
                c.client_acks.pubrec,
                c.client_acks.pubrel,
                c.violations.total(),
                c.unsolicited.total(),
                c.outstanding.total(),
            )?;
            for line in &connection.described {
                writeln!(f, "    {line}")?;
            }
        }
        Ok(())
    }
}

/// Which peer sent a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Client,
    Broker,
}

/// The ack-order state of one connection, fed with the bytes of both directions.
pub(crate) struct ConnectionAcks {
    id: u64,
    open: bool,
    protocol_level: Option<u8>,
    client: Scanner,
    broker: Scanner,
    /// Ids owed, per [`AckKind`], in receive order.
    owed: [Owed; 3],
    tally: AckTally,
    described: Vec<String>,
}

impl ConnectionAcks {
    /// A fresh ledger for the connection the proxy numbered `id`.
    pub(crate) fn new(id: u64) -> ConnectionAcks {
        ConnectionAcks {
            id,
            open: true,
            protocol_level: None,
            client: Scanner::new(),
            broker: Scanner::new(),
            owed: [Owed::default(), Owed::default(), Owed::default()],
            tally: AckTally::default(),
            described: Vec::new(),
        }
    }

    /// Accounts for bytes the client sent. Returns how many SUBSCRIBE packets start in
    /// `chunk` and the offset of the first one.
    pub(crate) fn client_sent(&mut self, chunk: &[u8]) -> (usize, Option<usize>) {
        let mut subscribes = 0;
        let mut first = None;
        let mut client = std::mem::replace(&mut self.client, Scanner::new());
        client.scan(chunk, |at, frame| {
            if frame == Frame::Subscribe {
                subscribes += 1;
                first.get_or_insert(at);
            }
            self.apply(Peer::Client, frame);
        });
        self.client = client;
        (subscribes, first)
    }

    /// Accounts for bytes the broker sent.
    pub(crate) fn broker_sent(&mut self, chunk: &[u8]) {
        let mut broker = std::mem::replace(&mut self.broker, Scanner::new());
        broker.scan(chunk, |_, frame| self.apply(Peer::Broker, frame));
        self.broker = broker;
    }

    /// Ends the accounting: ids still owed stay counted as outstanding, not as
    /// violations, and later bytes are ignored.
    pub(crate) fn close(&mut self) {
        self.open = false;
    }

    /// Whether [`close`](ConnectionAcks::close) has not been called.
    pub(crate) fn is_open(&self) -> bool {
        self.open
    }

    /// The client's acks of every kind so far.
    pub(crate) fn client_acks(&self) -> u64 {
        self.tally.client_acks.total()
    }

    /// This connection's part of a report.
    pub(crate) fn report(&self) -> ConnectionReport {
        let mut tally = self.tally;
        for kind in AckKind::ALL {
            *tally.outstanding.get_mut(kind) = self.owed[kind.index()].len() as u64;
        }
        ConnectionReport {
            id: self.id,
            protocol_level: self.protocol_level,
            open: self.open,
            tally,
            described: self.described.clone(),
        }
    }

    fn apply(&mut self, from: Peer, frame: Frame) {
        if !self.open {
            return;
        }
        match (from, frame) {
            (Peer::Client, Frame::Connect { level }) => self.protocol_level = Some(level),
            (Peer::Broker, Frame::Publish { qos, id }) => {
                self.tally.publishes_to_client[usize::from(qos)] += 1;
                match qos {
                    1 => self.owe(AckKind::Puback, id),
                    2 => self.owe(AckKind::Pubrec, id),
                    _ => {}
                }
            }
            (Peer::Client, Frame::Publish { qos, .. }) => {
                self.tally.publishes_from_client[usize::from(qos)] += 1;
            }
            (Peer::Broker, Frame::Ack { kind, id }) => match kind {
                Ack::Puback => self.tally.broker_acks.puback += 1,
                Ack::Pubrec => {
                    self.tally.broker_acks.pubrec += 1;
                    self.owe(AckKind::Pubrel, id);
                }
                Ack::Pubrel => self.tally.broker_acks.pubrel += 1,
                Ack::Pubcomp => self.tally.broker_pubcomps += 1,
            },
            (Peer::Client, Frame::Ack { kind, id }) => match kind {
                Ack::Puback => self.acked(AckKind::Puback, id),
                Ack::Pubrec => self.acked(AckKind::Pubrec, id),
                Ack::Pubrel => self.acked(AckKind::Pubrel, id),
                Ack::Pubcomp => self.tally.client_pubcomps += 1,
            },
            (_, Frame::Malformed) => self.tally.framing_errors += 1,
            (_, Frame::Subscribe | Frame::Connect { .. }) => {}
        }
    }

    fn owe(&mut self, kind: AckKind, id: u16) {
        if !self.owed[kind.index()].push(id) {
            self.tally.repeated_publishes += 1;
        }
    }

    fn acked(&mut self, kind: AckKind, id: u16) {
        *self.tally.client_acks.get_mut(kind) += 1;
        match self.owed[kind.index()].ack(id) {
            Acked::InOrder => {}
            Acked::NotHead { head } => {
                let violations = self.tally.violations.get_mut(kind);
                *violations += 1;
                if *violations <= DESCRIBED_PER_KIND {
                    self.described.push(format!(
                        "conn {}: {} {id} while {head} was head",
                        self.id,
                        kind.name()
                    ));
                }
            }
            Acked::NotOwed => *self.tally.unsolicited.get_mut(kind) += 1,
        }
    }
}

impl fmt::Debug for ConnectionAcks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionAcks")
            .field("id", &self.id)
            .field("open", &self.open)
            .field("tally", &self.tally)
            .finish_non_exhaustive()
    }
}

/// Ids owed one kind of ack, in receive order.
///
/// Removing an id from the middle (a violation) leaves a stale entry in `order`,
/// recognised by its serial no longer matching `live`; stale entries are dropped when
/// they reach the front. Every operation is amortised O(1), so a client that acks
/// thousands of messages backwards does not make the proxy quadratic.
#[derive(Default)]
struct Owed {
    order: VecDeque<(u16, u64)>,
    /// Owed id -> serial of its entry in `order`.
    live: HashMap<u16, u64>,
    next_serial: u64,
}

enum Acked {
    InOrder,
    NotHead { head: u16 },
    NotOwed,
}

impl Owed {
    /// Adds `id` at the back; `false` (and no change) if it is already owed.
    fn push(&mut self, id: u16) -> bool {
        if self.live.contains_key(&id) {
            return false;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        self.live.insert(id, serial);
        self.order.push_back((id, serial));
        true
    }

    /// The front of `order` is always live (stale entries are dropped as soon as they
    /// reach it), so the head is read in O(1).
    fn ack(&mut self, id: u16) -> Acked {
        let Some(serial) = self.live.remove(&id) else {
            return Acked::NotOwed;
        };
        let (head, head_serial) = *self.order.front().expect("an owed id is in the queue");
        if head_serial == serial {
            self.order.pop_front();
            self.drop_stale();
            Acked::InOrder
        } else {
            Acked::NotHead { head }
        }
    }

    fn drop_stale(&mut self) {
        while let Some(&(id, serial)) = self.order.front() {
            if self.live.get(&id) == Some(&serial) {
                break;
            }
            self.order.pop_front();
        }
    }

    fn len(&self) -> usize {
        self.live.len()
    }
}
