//! MQTT messaging as a [tower] stack.
//!
//! Incoming publishes become [`Request<Envelope>`](Request) values that flow
//! through ordinary tower middleware into a topic [`Router`] of handlers. A
//! handler is an `async fn` or any [`tower::Service`], so it is tested with
//! `ServiceExt::oneshot` and no broker.
//!
//! ```
//! use tower::ServiceExt;
//! use tower_mqtt::{Data, Envelope, Outcome, Request, Router};
//!
//! #[derive(serde::Deserialize)]
//! struct Say { text: String }
//!
//! async fn say(Data(say): Data<Say>) -> Result<(), std::io::Error> {
//!     println!("{}", say.text);
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let router = Router::new().route("tts/say", say);
//!
//! let env = Envelope::new("tts.say", serde_json::json!({"text": "hello"})).unwrap();
//! let req = Request::builder("tts/say").body(env).unwrap();
//! assert!(matches!(router.oneshot(req).await.unwrap(), Outcome::Handled));
//! # }
//! ```
//!
//! The pieces:
//! - [`Envelope`]: the fleet's five-key JSON envelope;
//! - [`Request`], [`QoS`], [`TopicName`], [`TopicFilter`]: the message model;
//! - [`Router`], [`Subscription`], [`handler`]: routing and handlers, with the
//!   extractors [`Data`], [`State`], [`Wildcard`], [`Wildcards`], [`Extension`];
//! - [`Outcome`], [`IntoOutcome`], [`HandlerError`]: what became of a message;
//! - [`Publisher`]: publishing, through the outbound stack;
//! - [`layers`]: the middleware of both stacks, inbound (decode, dedup,
//!   correlation spans, isolation, retry, timeout) and outbound (correlation,
//!   encode, size guard, retry, confirmation);
//!   [`config::Config::inbound_stack`] and [`config::Config::outbound_stack`]
//!   build the two stacks a service runs;
//! - [`serve`], [`config`], [`Running`], [`health`]: the runtime that connects,
//!   subscribes, acknowledges, reconnects and shuts down.
//!
//! `docs/ARCHITECTURE.md` in the repository draws the three parts and who
//! owns what.
//!
//! [tower]: https://docs.rs/tower

pub mod config;
#[cfg(feature = "embedded-broker")]
pub mod embedded;
pub mod health;
pub mod publisher;
pub mod reply;
pub mod runtime;

pub use tower_mqtt_core::{
    correlation, envelope, extract, handler, metrics, outcome, properties, request, router,
    subscription, topic,
};
/// The middleware of both stacks: inbound (decode, dedup, correlation span, isolation, retry, timeout) and
/// its outbound mirror ([`layers::outbound`]: correlation, encode, size guard,
/// retry, confirmation), with [`layers::InboundStack`] and
/// [`layers::OutboundStack`] composing them.
pub use tower_mqtt_layers as layers;

pub use envelope::{Envelope, EnvelopeError};
pub use extract::{Data, Extension, FromRef, State, Wildcard, Wildcards};
pub use handler::{Handler, HandlerResult};
pub use outcome::{BoxError, HandlerError, IntoOutcome, Outcome};
pub use properties::Properties;
pub use publisher::{Publish, PublishError, Published, Publisher, Recorded};
pub use request::{Extensions, HandledBefore, QoS, Request};
pub use router::Router;
pub use runtime::{
    shutdown_signal, Client, ConnectionState, Running, Serve, ShutdownHandle, ShutdownReport,
};

/// Serves `router` with the configuration `config`: connects (with
/// reconnection), subscribes to the router's filters, and runs every message
/// through the inbound stack the configuration asks for into the
/// router. Await it, or [`Serve::spawn`] it for a handle.
///
/// ```no_run
/// use tower_mqtt::{config::Config, Data, Router};
///
/// #[derive(serde::Deserialize)]
/// struct Say { text: String }
///
/// async fn say(Data(say): Data<Say>) { println!("{}", say.text) }
///
/// #[tokio::main]
/// async fn main() -> Result<(), tower_mqtt::BoxError> {
///     let router = Router::new().route("tts/say", say);
///     tower_mqtt::serve(Config::from_env()?, router)
///         .with_graceful_shutdown(tower_mqtt::shutdown_signal())
///         .await?;
///     Ok(())
/// }
/// ```
pub fn serve(config: config::Config, router: Router) -> Serve {
    Serve::new(Client::new(config), router)
}
pub use subscription::{Ack, AckOrder, IntoSubscription, Overflow, Subscription, UnknownAckOrder};
pub use topic::{TopicError, TopicFilter, TopicName, TopicParams};

/// The README's examples, compiled as doctests so they cannot drift.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The connection guide's examples, compiled and run as doctests.
#[doc = include_str!("../docs/CONNECTING.md")]
#[cfg(doctest)]
pub struct ConnectingDoctests;

/// The testing guide's examples, compiled and run as doctests.
#[doc = include_str!("../docs/TESTING.md")]
#[cfg(doctest)]
pub struct TestingDoctests;
