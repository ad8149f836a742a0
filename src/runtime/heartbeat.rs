//! The heartbeat: a QoS 0 message to `system/keepalive/<client id>` every
//! interval, which the client also subscribes to. When no publish at all has
//! come in for three intervals while the client was reading (its own
//! heartbeat would have), the connection is stalled ("connected but nothing
//! moves"), and the poll loop is asked to replace it.
//!
//! Any publish counts, not only the heartbeat's echo: behind a backlog the
//! echo waits unread behind thousands of messages, and a connection that
//! delivers them is anything but stalled.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    sync::{watch, Notify},
    time::Instant,
};
use tower::Service;
use tracing::{debug, warn};

use super::{running::ConnectionState, sink::Sink};
use crate::{
    health,
    request::{QoS, Request},
};

/// The heartbeat of one client; see the [module docs](self).
#[derive(Clone)]
pub(super) struct Heartbeat {
    pub(super) topic: String,
    pub(super) interval: Duration,
    pub(super) last_echo: Arc<Mutex<Instant>>,
    pub(super) force_reconnect: Arc<Notify>,
    /// Set while the poll loop has stopped reading: no echo can come back
    /// then, and that is not a stall.
    pub(super) reading_paused: Arc<AtomicBool>,
    /// Publishes the poll loop has read, the echo included.
    pub(super) publishes_read: Arc<AtomicU64>,
}

impl Heartbeat {
    /// Publishes a heartbeat every interval while connected; when nothing has
    /// come in for three intervals, asks the poll loop to reconnect.
    pub(super) async fn run(self, mut sink: Sink, mut state: watch::Receiver<ConnectionState>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut publishes = self.publishes_read.load(Ordering::Relaxed);
        loop {
            tick.tick().await;
            let now = self.publishes_read.load(Ordering::Relaxed);
            if now != publishes {
                publishes = now;
                *self.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
            }
            if self.reading_paused.load(Ordering::Relaxed) {
                *self.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
                continue;
            }
            if !state.borrow_and_update().is_connected() {
                // Waiting for the connection is not a stall.
                let _ = state.wait_for(ConnectionState::is_connected).await;
                *self.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
                continue;
            }
            let Ok(req) = Request::builder(self.topic.as_str())
                .qos(QoS::AtMostOnce)
                .body(Bytes::from(health::heartbeat_payload()))
            else {
                return;
            };
            let sent = tokio::time::timeout(self.interval, sink.call(req)).await;
            if !matches!(sent, Ok(Ok(()))) {
                debug!("heartbeat not written");
            }
            let silent = self.last_echo.lock().expect("heartbeat poisoned").elapsed();
            if silent > self.interval * 3 {
                warn!(
                    silent_ms = silent.as_millis(),
                    "no heartbeat came back for three intervals; reconnecting"
                );
                *self.last_echo.lock().expect("heartbeat poisoned") = Instant::now();
                // Only a poll loop waiting on this connection hears it; a
                // stored permit could cut the next, healthy one.
                self.force_reconnect.notify_waiters();
            }
        }
    }
}
