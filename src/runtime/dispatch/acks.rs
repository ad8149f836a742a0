//! Acknowledgement bookkeeping: a ticket for every QoS 1/2 message the
//! dispatcher holds, lines the tickets wait in, and tickets carried from one
//! connection to the next.
//!
//! **Lines.** [MQTT-4.6.0-2] and [MQTT-4.6.0-3] ask for PUBACK and PUBREC in
//! the order the PUBLISH packets were received on the connection (MQTT 5
//! keeps the rule, and rumqttd closes the connection of a client that breaks
//! it). Handlers finish in any order, so each message takes a slot in a line
//! when it arrives, a handled message marks its slot, and acknowledgements
//! leave from the head only. By default there is one line per connection;
//! [`AckOrder::Topic`](crate::AckOrder::Topic) gives each topic a line of its
//! own, outside the rule.
//!
//! **Carried tickets.** When a connection ends, every message not yet
//! acknowledged *on the wire* (queued, running, handled and waiting for its
//! turn, or released but not yet written) keeps its ticket, keyed by packet
//! id. The broker may not give that packet id to another message before it has
//! our acknowledgement [MQTT-2.3.1-3, -4], and a persistent session delivers
//! the message again under the same id [MQTT-4.4.0-1]. So when a delivery on a
//! later connection has the id of a carried ticket (and the same topic and
//! payload: a fingerprint guards against a broker that reuses ids anyway), it
//! is that message: it joins the ticket instead of running a second time. A
//! queued or running copy is acknowledged when it finishes, a handled one at
//! once, each in its turn of the new connection's line. This holds however
//! many reconnects come and whatever the dedup layer's window, and holds no
//! payload: at most one ticket per packet id (65,535), a few dozen bytes each.
//!
//! **Acknowledged, perhaps.** An acknowledgement written just before a
//! connection broke may be lost with it, and the broker then delivers that
//! message again, possibly much later (mosquitto 2.0.11 queued such
//! redeliveries behind thousands of newer messages, beyond the dedup layer's
//! window). The last acknowledgements written on a connection are remembered
//! too, up to a bound; a delivery that matches one is marked
//! [`HandledBefore`](crate::HandledBefore) for the dedup layer. It is not
//! acknowledged here without handling: once the broker has our
//! acknowledgement it may give the packet id to a new message, and a new
//! message with the same bytes (a raw payload sent twice) must run.

use std::collections::VecDeque;

use hashbrown::HashMap;
use slab::Slab;
use tokio::sync::mpsc::UnboundedSender;

use crate::{request::QoS, runtime::wire::Received};

/// What an acknowledgement needs: the packet id and which packet to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AckPacket {
    pub(crate) pkid: u16,
    pub(crate) qos: QoS,
}

impl AckPacket {
    /// The acknowledgement a publish asks for, or `None` for QoS 0.
    pub(crate) fn of(publish: &Received) -> Option<Self> {
        (publish.qos != QoS::AtMostOnce).then_some(Self {
            pkid: publish.pkid,
            qos: publish.qos,
        })
    }
}

/// A ticket's index.
pub(super) type TicketId = usize;
/// A line's index.
pub(super) type LineId = usize;
/// The line of the whole connection, always present.
pub(super) const CONNECTION_LINE: LineId = 0;

struct Ticket {
    packet: AckPacket,
    /// Of topic and payload; tells a redelivery from another message that
    /// got the same packet id.
    fingerprint: u64,
    /// Its line and sequence number on the current connection; `None` while
    /// carried and not delivered again yet.
    slot: Option<(LineId, u64)>,
    handled: bool,
    carried: bool,
}

/// One line: slots in arrival order, each a ticket and whether it is handled.
#[derive(Default)]
struct Line {
    next_seq: u64,
    slots: VecDeque<(TicketId, bool)>,
}

impl Line {
    fn push(&mut self, ticket: TicketId) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.slots.push_back((ticket, false));
        seq
    }

    /// Marks slot `seq` handled. Slots are in sequence order, so its position
    /// is an offset from the head.
    fn mark(&mut self, seq: u64) {
        let head = self.next_seq - self.slots.len() as u64;
        let slot = usize::try_from(seq.wrapping_sub(head))
            .ok()
            .and_then(|index| self.slots.get_mut(index));
        if let Some(slot) = slot {
            slot.1 = true;
        }
    }

    fn pop_handled(&mut self) -> Option<TicketId> {
        match self.slots.front() {
            Some(&(ticket, true)) => {
                self.slots.pop_front();
                Some(ticket)
            }
            _ => None,
        }
    }
}

/// What became of a delivery whose packet id belongs to a carried ticket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rejoin {
    /// The delivery was that message again, and took its ticket's place in
    /// the line.
    Joined,
    /// The delivery was that message again, but this connection withholds;
    /// the ticket stays carried for the next one.
    Withheld,
    /// Another message: handle it as new.
    New,
}

/// See the [module docs](self).
pub(super) struct Acks {
    tickets: Slab<Ticket>,
    lines: Slab<Line>,
    carried: HashMap<u16, TicketId>,
    /// Released on this connection, oldest first: the written ones (the last
    /// `remembered` of them) and those perhaps not yet written.
    released_log: VecDeque<(AckPacket, u64)>,
    /// Written on an earlier connection and perhaps lost with it: fingerprints
    /// by packet id, and their order for the bound.
    maybe_acked: HashMap<u16, u64>,
    maybe_acked_order: VecDeque<(u16, u64)>,
    /// How many written acknowledgements are remembered.
    remembered: usize,
    /// Released on this connection.
    released: u64,
    /// Handled tickets holding a slot: finished messages waiting for their
    /// turn.
    waiting: usize,
    epoch: u64,
    out: UnboundedSender<(u64, AckPacket)>,
}

impl Acks {
    /// Released acknowledgements go to `out`, tagged with their connection's
    /// epoch; the last `remembered` written ones are remembered when a
    /// connection ends.
    pub(super) fn new(out: UnboundedSender<(u64, AckPacket)>, remembered: usize) -> Self {
        let mut lines = Slab::new();
        let connection = lines.insert(Line::default());
        debug_assert_eq!(connection, CONNECTION_LINE);
        Self {
            tickets: Slab::new(),
            lines,
            carried: HashMap::new(),
            released_log: VecDeque::new(),
            maybe_acked: HashMap::new(),
            maybe_acked_order: VecDeque::new(),
            remembered,
            released: 0,
            waiting: 0,
            epoch: 0,
            out,
        }
    }

    /// A line of its own (a topic's, under `AckOrder::Topic`).
    pub(super) fn new_line(&mut self) -> LineId {
        self.lines.insert(Line::default())
    }

    /// Gives back an empty line.
    pub(super) fn free_line(&mut self, line: LineId) {
        if line != CONNECTION_LINE && self.line_is_empty(line) {
            self.lines.remove(line);
        }
    }

    pub(super) fn line_is_empty(&self, line: LineId) -> bool {
        self.lines[line].slots.is_empty()
    }

    /// A ticket for a message that just arrived, in the last slot of `line`.
    pub(super) fn take(&mut self, packet: AckPacket, fingerprint: u64, line: LineId) -> TicketId {
        let ticket = self.tickets.insert(Ticket {
            packet,
            fingerprint,
            slot: None,
            handled: false,
            carried: false,
        });
        let seq = self.lines[line].push(ticket);
        self.tickets[ticket].slot = Some((line, seq));
        ticket
    }

    /// The message of `ticket` is done with (handled, failed or dropped):
    /// releases every acknowledgement now at the head of its line. `written`
    /// is how many acknowledgements of this connection were written so far.
    pub(super) fn handled(&mut self, ticket: TicketId, written: u64) {
        let entry = &mut self.tickets[ticket];
        entry.handled = true;
        match entry.slot {
            Some((line, seq)) => {
                self.waiting += 1;
                self.lines[line].mark(seq);
                self.release(line, written);
            }
            // Carried and not delivered again yet: its redelivery will be
            // acknowledged when it comes. Without a session, nothing will.
            None if !entry.carried => {
                self.tickets.remove(ticket);
            }
            None => {}
        }
    }

    /// Checks a delivery whose packet id may belong to a carried ticket; see
    /// [`Rejoin`].
    pub(super) fn rejoin(
        &mut self,
        packet: AckPacket,
        fingerprint: u64,
        line: LineId,
        withholding: bool,
        written: u64,
    ) -> Rejoin {
        let Some(&ticket) = self.carried.get(&packet.pkid) else {
            return Rejoin::New;
        };
        let entry = &self.tickets[ticket];
        if entry.fingerprint != fingerprint || entry.packet.qos != packet.qos {
            // The broker has moved on from that message: nothing will come
            // back for the ticket.
            self.uncarry(packet.pkid);
            return Rejoin::New;
        }
        if withholding {
            return Rejoin::Withheld;
        }
        self.carried.remove(&packet.pkid);
        let seq = self.lines[line].push(ticket);
        let entry = &mut self.tickets[ticket];
        entry.carried = false;
        entry.slot = Some((line, seq));
        if entry.handled {
            self.waiting += 1;
            self.lines[line].mark(seq);
            self.release(line, written);
        }
        Rejoin::Joined
    }

    /// Whether any ticket is carried: the fast path skips the lookup.
    pub(super) fn carrying(&self) -> bool {
        !self.carried.is_empty()
    }

    /// The connection ended with `written` of its acknowledgements written:
    /// every ticket not acknowledged on the wire is carried, and the lines
    /// start over.
    pub(super) fn connection_lost(&mut self, written: u64) {
        self.epoch += 1;
        let mut carry = Vec::new();
        for (_, line) in &mut self.lines {
            carry.extend(line.slots.drain(..).map(|(ticket, _)| ticket));
        }
        for ticket in carry {
            let entry = &mut self.tickets[ticket];
            entry.slot = None;
            if entry.handled {
                self.waiting -= 1;
            }
            self.carry(ticket);
        }
        // The newest releases beyond those written never reached the broker;
        // the written ones before them perhaps did not either.
        let unwritten =
            usize::try_from(self.released.saturating_sub(written)).unwrap_or(usize::MAX);
        let split = self.released_log.len().saturating_sub(unwritten);
        let log: Vec<_> = self.released_log.drain(..).collect();
        let (written_log, unwritten_log) = log.split_at(split);
        for &(packet, fingerprint) in written_log {
            self.maybe_acked.insert(packet.pkid, fingerprint);
            self.maybe_acked_order.push_back((packet.pkid, fingerprint));
        }
        while self.maybe_acked_order.len() > self.remembered {
            if let Some((pkid, fingerprint)) = self.maybe_acked_order.pop_front() {
                if self.maybe_acked.get(&pkid) == Some(&fingerprint) {
                    self.maybe_acked.remove(&pkid);
                }
            }
        }
        for &(packet, fingerprint) in unwritten_log {
            let ticket = self.tickets.insert(Ticket {
                packet,
                fingerprint,
                slot: None,
                handled: true,
                carried: false,
            });
            self.carry(ticket);
        }
        self.released = 0;
    }

    /// CONNACK: without a session, the broker will deliver none of the carried
    /// messages again, so none will be acknowledged.
    pub(super) fn connected(&mut self, session_present: bool) {
        if !session_present {
            let pkids: Vec<u16> = self.carried.keys().copied().collect();
            for pkid in pkids {
                self.uncarry(pkid);
            }
            self.maybe_acked.clear();
            self.maybe_acked_order.clear();
        }
    }

    /// Whether a delivery repeats a message whose acknowledgement was written
    /// on an earlier connection (see the [module docs](self)). A packet id
    /// checked here is forgotten either way: the broker has moved on from it.
    pub(super) fn handled_before(&mut self, packet: AckPacket, fingerprint: u64) -> bool {
        !self.maybe_acked.is_empty()
            && self
                .maybe_acked
                .remove(&packet.pkid)
                .is_some_and(|remembered| remembered == fingerprint)
    }

    /// Finished messages waiting for their turn.
    pub(super) fn waiting(&self) -> usize {
        self.waiting
    }

    /// Acknowledgements released on this connection.
    pub(super) fn released(&self) -> u64 {
        self.released
    }

    /// Tickets carried from earlier connections, not yet delivered again.
    pub(super) fn carried(&self) -> usize {
        self.carried.len()
    }

    fn carry(&mut self, ticket: TicketId) {
        let pkid = self.tickets[ticket].packet.pkid;
        self.tickets[ticket].carried = true;
        if let Some(previous) = self.carried.insert(pkid, ticket) {
            if previous != ticket {
                // Only a broker that reused an unacknowledged id gets here.
                self.drop_carried(previous);
            }
        }
    }

    fn uncarry(&mut self, pkid: u16) {
        if let Some(ticket) = self.carried.remove(&pkid) {
            self.drop_carried(ticket);
        }
    }

    /// A ticket no redelivery will join: forgotten once its message is done.
    fn drop_carried(&mut self, ticket: TicketId) {
        let entry = &mut self.tickets[ticket];
        entry.carried = false;
        if entry.handled && entry.slot.is_none() {
            self.tickets.remove(ticket);
        }
    }

    /// Sends every acknowledgement at the head of `line` that is handled.
    fn release(&mut self, line: LineId, written: u64) {
        while let Some(ticket) = self.lines[line].pop_handled() {
            let entry = self.tickets.remove(ticket);
            self.waiting -= 1;
            self.released += 1;
            // The receiver lives as long as the runtime; after shutdown there
            // is nothing left to acknowledge to.
            let _ = self.out.send((self.epoch, entry.packet));
            self.released_log
                .push_back((entry.packet, entry.fingerprint));
        }
        let keep = self.released.saturating_sub(written) + self.remembered as u64;
        while self.released_log.len() as u64 > keep {
            self.released_log.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;

    fn packet(pkid: u16) -> AckPacket {
        AckPacket {
            pkid,
            qos: QoS::AtLeastOnce,
        }
    }

    fn acks() -> (Acks, mpsc::UnboundedReceiver<(u64, AckPacket)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Acks::new(tx, 4), rx)
    }

    fn sent(rx: &mut mpsc::UnboundedReceiver<(u64, AckPacket)>) -> Vec<u16> {
        let mut out = Vec::new();
        while let Ok((_, packet)) = rx.try_recv() {
            out.push(packet.pkid);
        }
        out
    }

    #[test]
    fn releases_in_arrival_order() {
        let (mut acks, mut rx) = acks();
        let a = acks.take(packet(1), 11, CONNECTION_LINE);
        let b = acks.take(packet(2), 12, CONNECTION_LINE);
        let c = acks.take(packet(3), 13, CONNECTION_LINE);
        acks.handled(c, 0);
        assert!(sent(&mut rx).is_empty(), "3 must wait for 1 and 2");
        assert_eq!(acks.waiting(), 1);
        acks.handled(a, 0);
        assert_eq!(sent(&mut rx), [1]);
        acks.handled(b, 0);
        assert_eq!(sent(&mut rx), [2, 3]);
        assert_eq!(acks.waiting(), 0);
        assert!(acks.line_is_empty(CONNECTION_LINE));
    }

    #[test]
    fn qos0_asks_for_no_acknowledgement() {
        let mut publish = Received {
            topic: "t".to_owned(),
            payload: bytes::Bytes::from_static(&[1]),
            qos: QoS::AtMostOnce,
            retain: false,
            dup: false,
            pkid: 0,
            properties: None,
        };
        assert!(AckPacket::of(&publish).is_none());
        publish.qos = QoS::ExactlyOnce;
        publish.pkid = 7;
        let packet = AckPacket::of(&publish).unwrap();
        assert_eq!((packet.pkid, packet.qos), (7, QoS::ExactlyOnce));
    }

    #[test]
    fn a_redelivery_of_a_running_message_joins_it_and_is_acknowledged_once() {
        let (mut acks, mut rx) = acks();
        let running = acks.take(packet(5), 55, CONNECTION_LINE);
        acks.connection_lost(0);
        acks.connected(true);
        assert_eq!(acks.carried(), 1);
        let other = acks.take(packet(9), 99, CONNECTION_LINE);
        // The redelivery arrives after another message on the new connection.
        assert_eq!(
            acks.rejoin(packet(5), 55, CONNECTION_LINE, false, 0),
            Rejoin::Joined
        );
        acks.handled(other, 0);
        assert_eq!(sent(&mut rx), [9]);
        acks.handled(running, 0);
        assert_eq!(sent(&mut rx), [5], "acknowledged in its new turn");
        assert_eq!(acks.carried(), 0);
    }

    #[test]
    fn a_redelivery_of_a_handled_message_is_acknowledged_in_its_turn() {
        let (mut acks, mut rx) = acks();
        let head = acks.take(packet(1), 1, CONNECTION_LINE);
        let done = acks.take(packet(2), 2, CONNECTION_LINE);
        acks.handled(done, 0);
        acks.connection_lost(0);
        acks.connected(true);
        let fresh = acks.take(packet(3), 3, CONNECTION_LINE);
        assert_eq!(
            acks.rejoin(packet(2), 2, CONNECTION_LINE, false, 0),
            Rejoin::Joined
        );
        assert!(
            sent(&mut rx).is_empty(),
            "2 waits for 3, received before it"
        );
        acks.handled(fresh, 0);
        assert_eq!(sent(&mut rx), [3, 2]);
        acks.handled(head, 0);
        assert!(
            sent(&mut rx).is_empty(),
            "1 is carried until delivered again"
        );
    }

    #[test]
    fn released_but_unwritten_acknowledgements_are_carried() {
        let (mut acks, mut rx) = acks();
        for pkid in 1..=4 {
            let ticket = acks.take(packet(pkid), u64::from(pkid), CONNECTION_LINE);
            acks.handled(ticket, 0);
        }
        assert_eq!(sent(&mut rx), [1, 2, 3, 4]);
        // Two reached the wire before the connection broke.
        acks.connection_lost(2);
        acks.connected(true);
        assert_eq!(acks.carried(), 2);
        assert_eq!(
            acks.rejoin(packet(3), 3, CONNECTION_LINE, false, 0),
            Rejoin::Joined
        );
        assert_eq!(sent(&mut rx), [3]);
        assert_eq!(
            acks.rejoin(packet(1), 1, CONNECTION_LINE, false, 0),
            Rejoin::New
        );
    }

    #[test]
    fn written_acknowledgements_are_remembered_as_perhaps_lost() {
        let (mut acks, _rx) = acks();
        for pkid in 1..=6 {
            let ticket = acks.take(packet(pkid), u64::from(pkid), CONNECTION_LINE);
            acks.handled(ticket, u64::from(pkid));
        }
        // All six written; the last four (the bound) are remembered.
        acks.connection_lost(6);
        acks.connected(true);
        assert_eq!(acks.carried(), 0, "nothing certain to carry");
        assert!(!acks.handled_before(packet(2), 2), "beyond the bound");
        assert!(acks.handled_before(packet(5), 5));
        assert!(!acks.handled_before(packet(5), 5), "each is used once");
        assert!(
            !acks.handled_before(packet(6), 60),
            "other bytes: another message"
        );
        assert!(!acks.handled_before(packet(6), 6), "that id has moved on");
        acks.connection_lost(0);
        acks.connected(false);
        assert!(!acks.handled_before(packet(4), 4), "a new session forgets");
    }

    #[test]
    fn another_message_under_a_carried_id_is_new() {
        let (mut acks, _rx) = acks();
        let ticket = acks.take(packet(7), 70, CONNECTION_LINE);
        acks.handled(ticket, 0);
        acks.connection_lost(0);
        acks.connected(true);
        assert_eq!(
            acks.rejoin(packet(7), 71, CONNECTION_LINE, false, 0),
            Rejoin::New
        );
        assert_eq!(acks.carried(), 0);
    }

    #[test]
    fn without_a_session_nothing_is_carried() {
        let (mut acks, mut rx) = acks();
        let running = acks.take(packet(5), 5, CONNECTION_LINE);
        acks.connection_lost(0);
        acks.connected(false);
        assert_eq!(acks.carried(), 0);
        acks.handled(running, 0);
        assert!(sent(&mut rx).is_empty());
        assert_eq!(
            acks.rejoin(packet(5), 5, CONNECTION_LINE, false, 0),
            Rejoin::New
        );
    }

    #[test]
    fn a_withholding_connection_leaves_the_ticket_carried() {
        let (mut acks, mut rx) = acks();
        let ticket = acks.take(packet(5), 5, CONNECTION_LINE);
        acks.handled(ticket, 0);
        acks.connection_lost(1);
        // Released and written: nothing carried. Take a running one instead.
        let running = acks.take(packet(6), 6, CONNECTION_LINE);
        acks.connection_lost(0);
        acks.connected(true);
        assert_eq!(
            acks.rejoin(packet(6), 6, CONNECTION_LINE, true, 0),
            Rejoin::Withheld
        );
        assert_eq!(acks.carried(), 1);
        acks.handled(running, 0);
        let _ = sent(&mut rx);
        acks.connection_lost(0);
        acks.connected(true);
        assert_eq!(
            acks.rejoin(packet(6), 6, CONNECTION_LINE, false, 0),
            Rejoin::Joined
        );
        assert_eq!(sent(&mut rx), [6]);
    }
}
