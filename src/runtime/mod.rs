//! The part every service runs: connect, subscribe, dispatch, acknowledge,
//! reconnect, report health, shut down.
//!
//! [`serve`](crate::serve) runs a router on a [`Client`], which supervises one
//! rumqttc connection:
//!
//! - **Reconnection** with exponential backoff and full jitter between
//!   `reconnect_min_delay` and `reconnect_max_delay`, reset once a connection
//!   has stayed up; every CONNACK subscribes again to the router's filters,
//!   even when the broker resumes a session. The state is observable with [`Client::state`].
//! - **Dispatch** on its own tasks: the poll loop never waits for a handler.
//!   Each topic has a FIFO; a topic's messages run in arrival order, topics
//!   side by side, at most [`Serve::max_in_flight`] at once. Each route has
//!   a capacity with an [`Overflow`](crate::Overflow) policy.
//! - **A memory bound of its own**: at most `max_pending` messages and
//!   `max_pending_bytes` payload bytes are held (queued, running, or waiting
//!   for their acknowledgement's turn). At the limit the poll loop stops
//!   reading from the broker, so TCP makes the broker wait, and keeps the
//!   connection alive with PINGREQs; it reads again below three quarters of
//!   the limit. While a handler's own QoS 1/2 publish awaits its PUBACK the
//!   poll loop must read on: QoS 0 past the limit is then dropped, and QoS
//!   1/2 is withheld (not kept, not acknowledged) and taken back by a
//!   deliberate reconnect once the held messages are done, which a persistent
//!   session makes lossless; a clean session, which could not deliver them
//!   again, keeps them instead. [`Stats`] counts every case.
//! - **Acknowledgement after handling**: QoS 1 and 2 messages are acknowledged
//!   when their outcome is known (see [`Outcome`]), in arrival order within
//!   each topic (or across the connection: [`AckOrder`](crate::AckOrder)),
//!   so a slow handler holds back only its own topic. A route can ask for
//!   acknowledgement on receipt instead ([`Ack`](crate::Ack)). With
//!   `clean_session = false`, a message whose handler never finished (the
//!   process died) is delivered again.
//! - **Health and heartbeat** when enabled in the [`Config`](crate::config::Config): retained health
//!   on connect and shutdown and as the Last Will; a heartbeat that the client
//!   also subscribes to, so a heartbeat that does not come back within three
//!   intervals forces a reconnect ("connected but nothing moves").
//! - **Graceful shutdown** when the signal given to
//!   [`Serve::with_graceful_shutdown`] completes, or through a
//!   [`ShutdownHandle`]: stop taking messages, let running handlers finish until
//!   the drain timeout, publish the final health, send DISCONNECT (so the Will
//!   is not published), join every task, and report.
//!
//! ```no_run
//! use tower_mqtt::{config::Config, Data, Router};
//!
//! #[derive(serde::Deserialize)]
//! struct Say { text: String }
//!
//! async fn say(Data(say): Data<Say>) { println!("{}", say.text) }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), tower_mqtt::BoxError> {
//!     let router = Router::new().route("tts/say", say);
//!     tower_mqtt::serve(Config::from_env()?, router)
//!         .with_graceful_shutdown(tower_mqtt::shutdown_signal())
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! [`Outcome`]: crate::Outcome

mod ack_writer;
mod client;
pub(crate) mod delivery;
mod dispatch;
mod heartbeat;
pub(crate) mod outbox;
mod poll;
mod running;
mod serve;
mod sink;
mod supervisor;
pub(crate) mod wire;

pub use crate::publisher::DeliveryError;

pub use self::{
    client::Client,
    running::{
        shutdown_signal, ConnectionState, DecodeFailures, ReadyError, RefusedSubscription, Running,
        ShutdownHandle, ShutdownReport, Stats,
    },
    serve::{Serve, DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_IN_FLIGHT},
};
