//! The message model of [tower-mqtt](https://docs.rs/tower-mqtt): what a
//! message is, where it goes and what became of it. Services depend on
//! `tower-mqtt`, which re-exports all of this; middleware crates may depend on
//! this crate alone, as tower middleware depends on `tower-service`.
//!
//! ```
//! use tower::ServiceExt;
//! use tower_mqtt::{Data, Envelope, Outcome, Request, Router};
//!
//! #[derive(serde::Deserialize)]
//! struct Say { text: String }
//!
//! async fn say(Data(say): Data<Say>) { println!("{}", say.text) }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let router = Router::new().route("tts/say", say);
//! let env = Envelope::new("tts.say", serde_json::json!({"text": "hello"})).unwrap();
//! let req = Request::builder("tts/say").body(env).unwrap();
//! assert!(matches!(router.oneshot(req).await.unwrap(), Outcome::Handled));
//! # }
//! ```

mod macros;

pub mod correlation;
pub mod envelope;
pub mod extract;
pub mod handler;
// Shared by the runtime and the layers crate; not part of the API.
#[doc(hidden)]
pub mod log_limit;
pub mod metrics;
pub mod outcome;
pub mod properties;
pub mod request;
pub mod router;
pub mod subscription;
pub mod topic;

pub use envelope::{Envelope, EnvelopeError};
pub use extract::{Data, State};
pub use handler::{Handler, HandlerResult};
pub use outcome::{BoxError, HandlerError, IntoOutcome, Outcome};
pub use properties::Properties;
pub use request::{Extensions, HandledBefore, QoS, Request};
pub use router::Router;
pub use subscription::{Ack, AckOrder, IntoSubscription, Overflow, Subscription, UnknownAckOrder};
pub use topic::{TopicError, TopicFilter, TopicName, TopicParams};
