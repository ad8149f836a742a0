//! Acknowledgement lines: PUBACK/PUBREC leave in arrival order, from the head
//! of a line only.
//!
//! MQTT 3.1.1 section 4.6 asks for acknowledgements in the order the PUBLISH
//! packets arrived; what it protects is each topic's redelivery order. Handlers
//! finish in any order, so each acknowledged message takes a slot on arrival; a
//! finished message marks its slot, and slots leave from the head. The
//! dispatcher keeps one line per topic (the default, [`AckOrder::Topic`]) or one
//! for the whole connection ([`AckOrder::Global`]).
//!
//! A slot keeps the packet id and QoS only, never the payload.
//!
//! [`AckOrder::Topic`]: crate::AckOrder::Topic
//! [`AckOrder::Global`]: crate::AckOrder::Global

use std::collections::VecDeque;

use rumqttc::{Publish, QoS};

/// What an acknowledgement needs: the packet id and which packet to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AckPacket {
    pub(crate) pkid: u16,
    pub(crate) qos: QoS,
}

impl AckPacket {
    /// The acknowledgement a publish asks for, or `None` for QoS 0.
    pub(crate) fn of(publish: &Publish) -> Option<Self> {
        (publish.qos != QoS::AtMostOnce).then_some(Self {
            pkid: publish.pkid,
            qos: publish.qos,
        })
    }

    /// The publish rumqttc's `AsyncClient::ack` takes: only its QoS and packet
    /// id are read.
    pub(crate) fn to_publish(self) -> Publish {
        let mut publish = Publish::new("", self.qos, bytes::Bytes::new());
        publish.pkid = self.pkid;
        publish
    }
}

struct Slot {
    seq: u64,
    packet: AckPacket,
    done: bool,
}

/// One line of acknowledgements; see the [module docs](self).
#[derive(Default)]
pub(crate) struct AckLine {
    next_seq: u64,
    slots: VecDeque<Slot>,
}

impl AckLine {
    /// Takes the next slot; the returned sequence number completes it.
    pub(crate) fn push(&mut self, packet: AckPacket) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.slots.push_back(Slot {
            seq,
            packet,
            done: false,
        });
        seq
    }

    /// Marks slot `seq` finished and hands every acknowledgement now at the
    /// head to `release`; returns how many left.
    pub(crate) fn complete(&mut self, seq: u64, mut release: impl FnMut(AckPacket)) -> usize {
        // Slots are in sequence order, so the position is an offset from the head.
        let Some(front) = self.slots.front().map(|slot| slot.seq) else {
            return 0;
        };
        let Some(slot) = usize::try_from(seq.wrapping_sub(front))
            .ok()
            .and_then(|index| self.slots.get_mut(index))
        else {
            return 0;
        };
        slot.done = true;
        let mut released = 0;
        while self.slots.front().is_some_and(|slot| slot.done) {
            let slot = self.slots.pop_front().expect("front exists");
            release(slot.packet);
            released += 1;
        }
        released
    }

    /// Whether no slot is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Forgets every slot (the connection they belong to is gone); returns how
    /// many of them were finished and only waiting for their turn.
    pub(crate) fn clear(&mut self) -> usize {
        let done = self.slots.iter().filter(|slot| slot.done).count();
        self.slots.clear();
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(pkid: u16) -> AckPacket {
        AckPacket {
            pkid,
            qos: QoS::AtLeastOnce,
        }
    }

    fn complete(line: &mut AckLine, seq: u64) -> Vec<u16> {
        let mut out = Vec::new();
        line.complete(seq, |p| out.push(p.pkid));
        out
    }

    #[test]
    fn releases_in_arrival_order() {
        let mut line = AckLine::default();
        let a = line.push(packet(1));
        let b = line.push(packet(2));
        let c = line.push(packet(3));
        assert!(complete(&mut line, c).is_empty(), "3 must wait for 1 and 2");
        assert_eq!(complete(&mut line, a), [1]);
        assert_eq!(complete(&mut line, b), [2, 3]);
        assert!(line.is_empty());
    }

    #[test]
    fn qos0_asks_for_no_acknowledgement() {
        let publish = Publish::new("t", QoS::AtMostOnce, vec![1]);
        assert!(AckPacket::of(&publish).is_none());
        let mut publish = Publish::new("t", QoS::ExactlyOnce, vec![1]);
        publish.pkid = 7;
        let packet = AckPacket::of(&publish).unwrap();
        let back = packet.to_publish();
        assert_eq!((back.pkid, back.qos), (7, QoS::ExactlyOnce));
        assert!(back.payload.is_empty());
    }

    #[test]
    fn clear_counts_the_finished_slots_it_forgets() {
        let mut line = AckLine::default();
        let _a = line.push(packet(1));
        let b = line.push(packet(2));
        assert!(complete(&mut line, b).is_empty());
        assert_eq!(line.clear(), 1);
        assert!(line.is_empty());
        assert!(
            complete(&mut line, b).is_empty(),
            "a forgotten slot stays forgotten"
        );
    }
}
