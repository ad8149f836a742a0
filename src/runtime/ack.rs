//! Acknowledgements after handling, released in the order messages arrived.
//!
//! MQTT 3.1.1 section 4.6 requires PUBACK (QoS 1) and PUBREC (QoS 2) in the
//! order the PUBLISH packets were received. Handlers finish in any order, so each
//! acknowledged message takes a slot on arrival; a finished message marks its
//! slot, and acknowledgements leave from the head of the line only.
//!
//! A reconnect starts a new epoch: slots of the old connection are forgotten.
//! Their packet ids meant nothing to the new connection; with a persistent
//! session the broker delivers such messages again, with new slots.

use std::{collections::VecDeque, sync::Mutex};

use rumqttc::{Publish, QoS};
use tokio::sync::mpsc;

/// Where a message stands in the acknowledgement order.
#[derive(Debug)]
pub(crate) struct AckToken {
    epoch: u64,
    seq: u64,
}

struct Slot {
    seq: u64,
    publish: Publish,
    done: bool,
}

struct Line {
    epoch: u64,
    next_seq: u64,
    slots: VecDeque<Slot>,
}

/// Orders acknowledgements; the released packets go to `released`, which a
/// single task drains into the client (so their order is kept).
pub(crate) struct AckSequencer {
    line: Mutex<Line>,
    released: mpsc::UnboundedSender<(u64, Publish)>,
}

impl AckSequencer {
    pub(crate) fn new(released: mpsc::UnboundedSender<(u64, Publish)>) -> Self {
        Self {
            line: Mutex::new(Line {
                epoch: 0,
                next_seq: 0,
                slots: VecDeque::new(),
            }),
            released,
        }
    }

    /// Takes a slot for `publish`, or `None` for QoS 0, which has no
    /// acknowledgement.
    pub(crate) fn register(&self, publish: &Publish) -> Option<AckToken> {
        if publish.qos == QoS::AtMostOnce {
            return None;
        }
        let mut line = self.line.lock().expect("ack line poisoned");
        let seq = line.next_seq;
        line.next_seq += 1;
        line.slots.push_back(Slot {
            seq,
            // The payload is not needed for an ack; keep the slot small.
            publish: Publish {
                payload: bytes::Bytes::new(),
                ..publish.clone()
            },
            done: false,
        });
        Some(AckToken {
            epoch: line.epoch,
            seq,
        })
    }

    /// Marks the message finished and releases every acknowledgement that is
    /// now at the head of the line.
    #[allow(clippy::needless_pass_by_value)] // a token is spent: completing twice is a bug
    pub(crate) fn complete(&self, token: AckToken) {
        let mut line = self.line.lock().expect("ack line poisoned");
        if token.epoch != line.epoch {
            return;
        }
        // Slots are in seq order, so the position is found from the front.
        let front = line.slots.front().map_or(0, |slot| slot.seq);
        let Ok(index) = usize::try_from(token.seq - front) else {
            return;
        };
        if let Some(slot) = line.slots.get_mut(index) {
            slot.done = true;
        }
        while line.slots.front().is_some_and(|slot| slot.done) {
            let slot = line.slots.pop_front().expect("front exists");
            // The receiver lives as long as the runtime; after shutdown there
            // is nothing left to acknowledge to.
            let _ = self.released.send((line.epoch, slot.publish));
        }
    }

    /// The current connection's epoch.
    pub(crate) fn epoch(&self) -> u64 {
        self.line.lock().expect("ack line poisoned").epoch
    }

    /// Forgets the slots of the previous connection.
    pub(crate) fn new_connection(&self) {
        let mut line = self.line.lock().expect("ack line poisoned");
        line.epoch += 1;
        line.slots.clear();
    }

    /// How many messages wait for an acknowledgement.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.line.lock().expect("ack line poisoned").slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(pkid: u16, qos: QoS) -> Publish {
        let mut p = Publish::new("t", qos, vec![1, 2, 3]);
        p.pkid = pkid;
        p
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<(u64, Publish)>) -> Vec<u16> {
        let mut out = Vec::new();
        while let Ok((_, p)) = rx.try_recv() {
            out.push(p.pkid);
        }
        out
    }

    #[test]
    fn releases_in_arrival_order() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let seq = AckSequencer::new(tx);
        let a = seq.register(&publish(1, QoS::AtLeastOnce)).unwrap();
        let b = seq.register(&publish(2, QoS::ExactlyOnce)).unwrap();
        let c = seq.register(&publish(3, QoS::AtLeastOnce)).unwrap();
        seq.complete(c);
        assert!(drain(&mut rx).is_empty(), "3 must wait for 1 and 2");
        seq.complete(a);
        assert_eq!(drain(&mut rx), [1]);
        seq.complete(b);
        assert_eq!(drain(&mut rx), [2, 3]);
        assert_eq!(seq.pending(), 0);
    }

    #[test]
    fn qos0_takes_no_slot() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let seq = AckSequencer::new(tx);
        assert!(seq.register(&publish(0, QoS::AtMostOnce)).is_none());
        assert_eq!(seq.pending(), 0);
    }

    #[test]
    fn a_new_connection_forgets_old_slots() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let seq = AckSequencer::new(tx);
        let old = seq.register(&publish(1, QoS::AtLeastOnce)).unwrap();
        seq.new_connection();
        let new = seq.register(&publish(1, QoS::AtLeastOnce)).unwrap();
        seq.complete(old);
        assert!(drain(&mut rx).is_empty());
        seq.complete(new);
        assert_eq!(drain(&mut rx), [1]);
    }
}
