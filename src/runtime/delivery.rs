//! Matching outgoing publishes to the broker's acknowledgements.
//!
//! rumqttc does not say which packet id a publish got. It does process requests
//! in the order they were sent and reports each one as `Outgoing::Publish(pkid)`,
//! so every publish takes a place in a FIFO when it is handed to the client, and
//! the next `Outgoing::Publish` event gives the head of the FIFO its packet id.
//! PUBACK (QoS 1) or PUBCOMP (QoS 2) for that id then confirms it; QoS 0 is
//! confirmed when written.
//!
//! After a disconnect rumqttc keeps unsent and unacknowledged publishes in its
//! `pending` list, and replays them if the broker resumes the session. If the
//! broker starts a clean session, rumqttc discards that list: those publishes
//! fail with [`DeliveryError::SessionLost`] so the caller can send them again.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use tokio::sync::oneshot;

use crate::publisher::DeliveryError;

pub(crate) type Waiter = Option<oneshot::Sender<Result<(), DeliveryError>>>;

#[derive(Default)]
struct Inner {
    /// Handed to the client, no packet id yet, in order.
    unassigned: VecDeque<Waiter>,
    /// Written with a packet id, waiting for PUBACK/PUBCOMP.
    by_pkid: HashMap<u16, Waiter>,
    /// How many of `unassigned` rumqttc moved to its pending list at the last
    /// disconnect.
    pending_unassigned: usize,
}

/// See the [module docs](self).
#[derive(Default)]
pub(crate) struct Deliveries {
    inner: Mutex<Inner>,
}

impl Deliveries {
    /// Takes the next place in the FIFO. Call with the lock order of the client
    /// channel: use [`Deliveries::with_place`].
    /// Runs `send` (which puts the publish into the client's channel) and, if it
    /// succeeded, takes the waiter into the next place in the FIFO.
    pub(crate) fn with_place<E>(
        &self,
        waiter: &mut Option<oneshot::Sender<Result<(), DeliveryError>>>,
        send: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let mut inner = self.inner.lock().expect("deliveries poisoned");
        // Holding the lock while the request enters the channel keeps the FIFO
        // in channel order when publishes race.
        send()?;
        inner.unassigned.push_back(waiter.take());
        Ok(())
    }

    /// `Outgoing::Publish(pkid)`.
    pub(crate) fn written(&self, pkid: u16) {
        let mut inner = self.inner.lock().expect("deliveries poisoned");
        if pkid != 0 && inner.by_pkid.contains_key(&pkid) {
            // A replay of a publish that already has its id.
            return;
        }
        let Some(waiter) = inner.unassigned.pop_front() else {
            return;
        };
        inner.pending_unassigned = inner.pending_unassigned.saturating_sub(1);
        if pkid == 0 {
            if let Some(tx) = waiter {
                let _ = tx.send(Ok(()));
            }
        } else {
            inner.by_pkid.insert(pkid, waiter);
        }
    }

    /// Takes back the waiters of publishes rumqttc held at a disconnect, given
    /// their packet ids in rumqttc's order (0 for those without one yet, which
    /// are the oldest of the FIFO).
    pub(crate) fn reclaim(&self, pkids: impl Iterator<Item = u16>) -> Vec<Waiter> {
        let mut inner = self.inner.lock().expect("deliveries poisoned");
        inner.pending_unassigned = 0;
        pkids
            .map(|pkid| {
                if pkid == 0 {
                    inner.unassigned.pop_front().flatten()
                } else {
                    inner.by_pkid.remove(&pkid).flatten()
                }
            })
            .collect()
    }

    /// PUBACK or PUBCOMP for `pkid`.
    pub(crate) fn confirmed(&self, pkid: u16) {
        self.settle(pkid, Ok(()));
    }

    /// MQTT 5: the broker refused the publish with `pkid` (PUBACK or PUBREC
    /// with a reason code of 0x80 or above).
    pub(crate) fn refused(&self, pkid: u16, code: u8, reason: String) {
        self.settle(pkid, Err(DeliveryError::Refused { code, reason }));
    }

    /// The broker answered the publish with `pkid`.
    fn settle(&self, pkid: u16, result: Result<(), DeliveryError>) {
        let waiter = self
            .inner
            .lock()
            .expect("deliveries poisoned")
            .by_pkid
            .remove(&pkid);
        if let Some(Some(tx)) = waiter {
            let _ = tx.send(result);
        }
    }

    /// The connection failed; rumqttc now holds `pending_unassigned` publishes
    /// without an id in its pending list.
    pub(crate) fn disconnected(&self, pending_unassigned: usize) {
        self.inner
            .lock()
            .expect("deliveries poisoned")
            .pending_unassigned = pending_unassigned;
    }

    /// CONNACK. Without a session rumqttc dropped its pending list: fail what
    /// was in it.
    pub(crate) fn connected(&self, session_present: bool) {
        let mut inner = self.inner.lock().expect("deliveries poisoned");
        if session_present {
            return;
        }
        let lost = inner.pending_unassigned.min(inner.unassigned.len());
        inner.pending_unassigned = 0;
        let mut failed: Vec<Waiter> = inner.unassigned.drain(..lost).collect();
        failed.extend(inner.by_pkid.drain().map(|(_, waiter)| waiter));
        drop(inner);
        for tx in failed.into_iter().flatten() {
            let _ = tx.send(Err(DeliveryError::SessionLost));
        }
    }

    /// Publishes handed to the client and not yet confirmed: while any is,
    /// the poll loop must keep reading, or its confirmation never arrives.
    pub(crate) fn unconfirmed(&self) -> usize {
        let inner = self.inner.lock().expect("deliveries poisoned");
        inner.unassigned.len() + inner.by_pkid.len()
    }

    /// The runtime stopped: fail everything.
    pub(crate) fn close(&self) {
        let mut inner = self.inner.lock().expect("deliveries poisoned");
        let mut failed: Vec<Waiter> = inner.unassigned.drain(..).collect();
        failed.extend(inner.by_pkid.drain().map(|(_, waiter)| waiter));
        drop(inner);
        for tx in failed.into_iter().flatten() {
            let _ = tx.send(Err(DeliveryError::Closed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(d: &Deliveries) -> oneshot::Receiver<Result<(), DeliveryError>> {
        let (tx, rx) = oneshot::channel();
        d.with_place(&mut Some(tx), || Ok::<(), ()>(())).unwrap();
        rx
    }

    #[test]
    fn confirms_in_fifo_order_by_packet_id() {
        let d = Deliveries::default();
        let mut qos1 = place(&d);
        let mut qos0 = place(&d);
        d.written(7);
        d.written(0);
        assert_eq!(qos0.try_recv().unwrap(), Ok(()));
        assert!(qos1.try_recv().is_err(), "not acknowledged yet");
        d.confirmed(7);
        assert_eq!(qos1.try_recv().unwrap(), Ok(()));
        assert_eq!(d.unconfirmed(), 0);
    }

    #[test]
    fn a_lost_session_fails_what_rumqttc_dropped() {
        let d = Deliveries::default();
        let mut written = place(&d);
        d.written(1);
        let mut pending = place(&d);
        d.disconnected(1);
        // Sent after the disconnect: still in the channel, not lost.
        let mut later = place(&d);
        d.connected(false);
        assert_eq!(written.try_recv().unwrap(), Err(DeliveryError::SessionLost));
        assert_eq!(pending.try_recv().unwrap(), Err(DeliveryError::SessionLost));
        assert!(later.try_recv().is_err());
        d.written(1);
        d.confirmed(1);
        assert_eq!(later.try_recv().unwrap(), Ok(()));
    }

    #[test]
    fn a_resumed_session_keeps_waiting() {
        let d = Deliveries::default();
        let mut rx = place(&d);
        d.written(3);
        d.disconnected(0);
        d.connected(true);
        d.written(3); // the replay
        d.confirmed(3);
        assert_eq!(rx.try_recv().unwrap(), Ok(()));
    }
}
