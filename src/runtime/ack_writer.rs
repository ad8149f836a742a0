//! The one task that hands acknowledgements to rumqttc: in the order the
//! dispatcher released them, and only on the connection their messages
//! arrived on.
//!
//! An acknowledgement that crossed into the next connection would acknowledge
//! whatever the broker bound to that packet id there, out of receive order,
//! and a strict broker (rumqttd) drops the connection for it. rumqttc offers
//! no way to tie a request to a connection, so a gate does: the writer checks
//! the connection's epoch and puts the acknowledgement into rumqttc's channel
//! under one lock, and the poll loop moves the gate on (under the same lock)
//! before it clears the stale ones out of rumqttc when a connection ends. The
//! writer never awaits room in the channel while holding the gate, or the
//! poll loop, which is what makes room, could wait on it.

use std::{sync::Mutex, time::Duration};

use tokio::{
    sync::{mpsc, Notify},
    task::JoinHandle,
};

use super::{dispatch::AckPacket, wire::Handle};

/// How long the writer waits before trying a full request channel again.
const ROOM_RETRY: Duration = Duration::from_millis(1);

/// The current connection's epoch, shared by the writer and the poll loop.
#[derive(Debug, Default)]
pub(super) struct AckGate {
    epoch: Mutex<u64>,
}

impl AckGate {
    /// The connection ended: acknowledgements released for it are no longer
    /// handed to rumqttc. Call before clearing rumqttc's stale requests.
    pub(super) fn close_connection(&self) {
        *self.epoch.lock().expect("ack gate poisoned") += 1;
    }
}

/// Starts the writer: it forwards `(epoch, packet)` pairs from `released` to
/// rumqttc, and on `goodbye` sends DISCONNECT after everything released
/// before it, then stops.
pub(super) fn spawn(
    client: Handle,
    gate: std::sync::Arc<AckGate>,
    mut released: mpsc::UnboundedReceiver<(u64, AckPacket)>,
    goodbye: std::sync::Arc<Notify>,
) -> JoinHandle<()> {
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        loop {
            tokio::select! {
                biased;
                Some((epoch, packet)) = released.recv() => {
                    forward(&client, &gate, epoch, packet).await;
                }
                () = goodbye.notified() => {
                    // A DISCONNECT that overtook released acknowledgements
                    // would have the session deliver those messages again.
                    client.disconnect().await;
                    break;
                }
            }
        }
    }))
}

/// Hands one acknowledgement to rumqttc if its connection is still the
/// current one, waiting for room in the channel outside the gate.
async fn forward(client: &Handle, gate: &AckGate, epoch: u64, packet: AckPacket) {
    loop {
        {
            let current = gate.epoch.lock().expect("ack gate poisoned");
            if *current != epoch {
                // Its connection is gone; a persistent session delivers the
                // message again, and the dispatcher knows it was not written.
                return;
            }
            // Full, or rumqttc is gone (then the runtime is shutting down and
            // aborts this task).
            if client.try_ack(packet) {
                return;
            }
        }
        tokio::time::sleep(ROOM_RETRY).await;
    }
}
