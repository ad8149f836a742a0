//! Handler arguments: what a handler takes from a message and from the
//! router's state.
//!
//! A handler is an `async fn` whose arguments are extractors, in any
//! combination and order, with at most one that takes the whole message
//! (`Request<Envelope>` or `Envelope`), which comes last:
//!
//! | extractor | gives |
//! |---|---|
//! | [`Data<T>`] | the envelope's `data`, decoded into `T` |
//! | [`State<T>`] | the router's state ([`Router::with_state`](crate::Router::with_state)), or a part of it ([`FromRef`]) |
//! | [`Wildcard<T>`] | the value of the filter's single wildcard, parsed into `T` |
//! | [`Wildcards<(A, B, ..)>`](Wildcards) | the values of every wildcard, parsed |
//! | [`TopicParams`], [`TopicName`], [`QoS`] | the wildcard values, the topic, the QoS |
//! | [`CorrelationId`] | the id that ties the message to its replies |
//! | [`Properties`] | the MQTT 5 properties: user properties, content type, response topic, correlation data (empty over MQTT 3.1.1) |
//! | [`Extension<T>`] | a value a layer put into the request's extensions |
//! | `Request<Envelope>`, [`Envelope`] | the whole message (last argument only) |
//!
//! An extractor that fails (data of the wrong shape, a wildcard that does not
//! parse, a missing extension) fails the message permanently, naming what was
//! missing; the handler does not run.
//!
//! ```
//! use std::sync::Arc;
//! use tower::ServiceExt;
//! use tower_mqtt::{extract::{State, Wildcard}, Data, Envelope, Outcome, Request, Router};
//!
//! #[derive(Default)]
//! struct Store { levels: std::sync::Mutex<Vec<(String, f64)>> }
//!
//! #[derive(serde::Deserialize)]
//! struct Level { db: f64 }
//!
//! async fn record(State(store): State<Arc<Store>>, Wildcard(room): Wildcard<String>, Data(level): Data<Level>) {
//!     store.levels.lock().unwrap().push((room, level.db));
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = Arc::new(Store::default());
//! let router = Router::new().route("audio/+/level", record).with_state(store.clone());
//!
//! let env = Envelope::new("audio.level", serde_json::json!({"db": 42.0})).unwrap();
//! let req = Request::builder("audio/kitchen/level").body(env).unwrap();
//! assert!(matches!(router.oneshot(req).await.unwrap(), Outcome::Handled));
//! assert_eq!(store.levels.lock().unwrap()[0], ("kitchen".to_owned(), 42.0));
//! # }
//! ```

use std::{any::TypeId, fmt, str::FromStr};

use serde::de::DeserializeOwned;

use crate::{
    correlation::CorrelationId,
    envelope::Envelope,
    outcome::HandlerError,
    properties::Properties,
    request::{QoS, Request},
    topic::{TopicName, TopicParams},
};

/// Takes a value from a message without consuming it; see the
/// [module docs](self).
///
/// Implement it for your own extractors:
///
/// ```
/// use tower_mqtt::{extract::FromMessageParts, Envelope, HandlerError, Request};
///
/// /// The sending service, from the envelope's `source`.
/// struct Source(String);
///
/// impl<S> FromMessageParts<S> for Source {
///     fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
///         Ok(Source(req.body().source().to_owned()))
///     }
/// }
/// ```
pub trait FromMessageParts<S>: Sized {
    /// Extracts the value, or fails the message.
    fn from_message_parts(req: &Request<Envelope>, state: &S) -> Result<Self, HandlerError>;
}

/// Takes a value from a message, consuming it: the last argument of a
/// handler. Every [`FromMessageParts`] is one too.
///
/// `M` tells the two kinds apart; it is inferred.
pub trait FromMessage<S, M = private::ViaMessage>: Sized {
    /// Extracts the value, or fails the message.
    fn from_message(req: Request<Envelope>, state: &S) -> Result<Self, HandlerError>;
}

mod private {
    /// Marks a [`FromMessage`](super::FromMessage) that consumes the message.
    #[derive(Debug)]
    pub enum ViaMessage {}
    /// Marks a [`FromMessage`](super::FromMessage) that only borrows it.
    #[derive(Debug)]
    pub enum ViaParts {}
}

impl<S, T: FromMessageParts<S>> FromMessage<S, private::ViaParts> for T {
    fn from_message(req: Request<Envelope>, state: &S) -> Result<Self, HandlerError> {
        T::from_message_parts(&req, state)
    }
}

impl<S> FromMessage<S> for Request<Envelope> {
    fn from_message(req: Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        Ok(req)
    }
}

impl<S> FromMessage<S> for Envelope {
    fn from_message(req: Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        Ok(req.into_body())
    }
}

/// The envelope's `data`, decoded into `T`.
///
/// ```
/// use tower_mqtt::Data;
///
/// #[derive(serde::Deserialize)]
/// struct Cancel { reason: String }
///
/// async fn on_cancel(Data(cancel): Data<Cancel>) {
///     println!("cancelled: {}", cancel.reason);
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Data<T>(pub T);

impl<S, T: DeserializeOwned> FromMessageParts<S> for Data<T> {
    fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        req.body().data_as::<T>().map(Data).map_err(|err| {
            HandlerError::permanent(format!(
                "data of {:?} on {} is not a {}: {err}",
                req.body().event_type(),
                req.topic(),
                std::any::type_name::<T>()
            ))
        })
    }
}

/// The router's state, or the part of it that `T` takes ([`FromRef`]).
///
/// ```
/// use std::sync::Arc;
/// use tower_mqtt::{extract::State, Envelope, Request, Router};
///
/// #[derive(Clone, Default)]
/// struct Counter(Arc<std::sync::atomic::AtomicU64>);
///
/// async fn count(State(counter): State<Counter>, _req: Request<Envelope>) {
///     counter.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
/// }
///
/// let router: Router = Router::new().route("events/#", count).with_state(Counter::default());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct State<T>(pub T);

impl<S, T: FromRef<S>> FromMessageParts<S> for State<T> {
    fn from_message_parts(_req: &Request<Envelope>, state: &S) -> Result<Self, HandlerError> {
        Ok(State(T::from_ref(state)))
    }
}

/// A part of a router's state that [`State`] can take on its own.
///
/// ```
/// use tower_mqtt::extract::FromRef;
///
/// #[derive(Clone)]
/// struct AppState { store: Store, name: String }
/// #[derive(Clone)]
/// struct Store;
///
/// impl FromRef<AppState> for Store {
///     fn from_ref(state: &AppState) -> Self { state.store.clone() }
/// }
/// // A handler can now take `State<Store>` from a router with `AppState`.
/// ```
pub trait FromRef<T> {
    /// Takes the part from the whole.
    fn from_ref(input: &T) -> Self;
}

impl<T: Clone> FromRef<T> for T {
    fn from_ref(input: &T) -> Self {
        input.clone()
    }
}

/// The value of the filter's single wildcard (`+` or `#`), parsed into `T`.
///
/// ```
/// use tower_mqtt::extract::Wildcard;
///
/// // On a route for "devices/+/state":
/// async fn state(Wildcard(device): Wildcard<String>) {
///     println!("{device} changed");
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wildcard<T>(pub T);

impl<S, T> FromMessageParts<S> for Wildcard<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        let params = params(req)?;
        if params.len() != 1 {
            return Err(HandlerError::permanent(format!(
                "Wildcard takes the value of exactly one wildcard, but the route for {} has {}",
                req.topic(),
                params.len()
            )));
        }
        parse(req, params, 0).map(Wildcard)
    }
}

/// The values of every wildcard of the filter, in order, each parsed: a tuple
/// of up to four types.
///
/// ```
/// use tower_mqtt::extract::Wildcards;
///
/// // On a route for "rooms/+/sensors/+":
/// async fn reading(Wildcards((room, sensor)): Wildcards<(String, u32)>) {
///     println!("{room}: sensor {sensor}");
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wildcards<T>(pub T);

/// What [`Wildcards`] can parse the values into: tuples of [`FromStr`] types.
pub trait FromWildcards: Sized {
    /// Parses the values of `req`'s wildcards.
    fn from_wildcards(req: &Request<Envelope>, params: &TopicParams) -> Result<Self, HandlerError>;
}

macro_rules! from_wildcards {
    ($count:literal; $($ty:ident $index:tt),+) => {
        impl<$($ty),+> FromWildcards for ($($ty,)+)
        where
            $($ty: FromStr, $ty::Err: fmt::Display,)+
        {
            fn from_wildcards(req: &Request<Envelope>, params: &TopicParams) -> Result<Self, HandlerError> {
                if params.len() != $count {
                    return Err(HandlerError::permanent(format!(
                        "Wildcards takes {} values, but the route for {} has {} wildcards",
                        $count,
                        req.topic(),
                        params.len()
                    )));
                }
                Ok(($(parse::<$ty>(req, params, $index)?,)+))
            }
        }
    };
}

from_wildcards!(1; A 0);
from_wildcards!(2; A 0, B 1);
from_wildcards!(3; A 0, B 1, C 2);
from_wildcards!(4; A 0, B 1, C 2, D 3);

impl<S, T: FromWildcards> FromMessageParts<S> for Wildcards<T> {
    fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        T::from_wildcards(req, params(req)?).map(Wildcards)
    }
}

fn params(req: &Request<Envelope>) -> Result<&TopicParams, HandlerError> {
    req.topic_params().ok_or_else(|| {
        HandlerError::permanent(format!(
            "no wildcard values for {}: the request did not come through a Router",
            req.topic()
        ))
    })
}

fn parse<T>(req: &Request<Envelope>, params: &TopicParams, index: usize) -> Result<T, HandlerError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    let raw = params.get(index).unwrap_or_default();
    raw.parse().map_err(|err| {
        HandlerError::permanent(format!(
            "wildcard {} of {} is {raw:?}, not a {}: {err}",
            index + 1,
            req.topic(),
            std::any::type_name::<T>()
        ))
    })
}

impl<S> FromMessageParts<S> for TopicParams {
    fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        params(req).cloned()
    }
}

/// The message's correlation id: the one the correlation layer set
/// ([`Request::correlation_id`]), else the envelope's id, which is what that
/// layer sets. Never fails.
///
/// ```
/// use tower_mqtt::correlation::CorrelationId;
///
/// async fn traced(id: CorrelationId) {
///     tokio::spawn(async move { println!("still working on {id}") });
/// }
/// ```
impl<S> FromMessageParts<S> for CorrelationId {
    fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        Ok(req
            .correlation_id()
            .cloned()
            .unwrap_or_else(|| CorrelationId::of(req.body())))
    }
}

/// The message's MQTT 5 properties, a copy of [`Request::properties`]: user
/// properties in order, content type, response topic, correlation data,
/// message expiry, payload format. Empty for a message received over MQTT
/// 3.1.1, which has none. Never fails.
///
/// A handler reads a user property by name with
/// [`Properties::user_property`] (the first of that name) or
/// [`Properties::user_property_values`] (all of them, in order):
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use tower::ServiceExt;
/// use tower_mqtt::{extract::State, Envelope, Outcome, Properties, Request, Router};
///
/// async fn per_tenant(State(seen): State<Arc<Mutex<Vec<String>>>>, props: Properties) {
///     let tenant = props.user_property("tenant").unwrap_or("default");
///     seen.lock().unwrap().push(tenant.to_owned());
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let router = Router::new().route("orders/new", per_tenant).with_state(seen.clone());
///
/// let mut props = Properties::new();
/// props.add_user_property("tenant", "acme");
/// let env = Envelope::new("orders.new", serde_json::json!({})).unwrap();
/// let req = Request::builder("orders/new").properties(props).body(env.clone()).unwrap();
/// assert!(matches!(router.clone().oneshot(req).await.unwrap(), Outcome::Handled));
/// // Over MQTT 3.1.1: no properties.
/// let req = Request::builder("orders/new").body(env).unwrap();
/// assert!(matches!(router.oneshot(req).await.unwrap(), Outcome::Handled));
///
/// assert_eq!(*seen.lock().unwrap(), ["acme", "default"]);
/// # }
/// ```
impl<S> FromMessageParts<S> for Properties {
    fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        Ok(req.properties().clone())
    }
}

impl<S> FromMessageParts<S> for TopicName {
    fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        Ok(req.topic().clone())
    }
}

impl<S> FromMessageParts<S> for QoS {
    fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        Ok(req.qos())
    }
}

/// A value a layer put into the request's extensions.
///
/// ```
/// use tower_mqtt::extract::Extension;
///
/// /// Put into the extensions by a layer of the service's own.
/// #[derive(Clone)]
/// struct Tenant(String);
///
/// async fn per_tenant(Extension(tenant): Extension<Tenant>) {
///     println!("handling for {}", tenant.0);
/// }
/// ```
///
/// The topic parameters and the correlation id are not extensions but fields
/// of the request, so `Extension<TopicParams>` and `Extension<CorrelationId>`
/// fail the message with a message that says so: take [`TopicParams`] or
/// [`CorrelationId`] as arguments of their own instead.
///
/// ```
/// use tower::ServiceExt;
/// use tower_mqtt::{extract::Extension, Envelope, Request, Router, TopicParams};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let router = Router::new().route("rooms/+", |_: Extension<TopicParams>| async {});
/// let env = Envelope::new("room.state", serde_json::json!({})).unwrap();
/// let outcome = router.oneshot(Request::builder("rooms/kitchen").body(env).unwrap()).await.unwrap();
/// assert!(outcome.error().unwrap().to_string().contains("take `TopicParams` as a handler argument"));
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extension<T>(pub T);

impl<S, T: Clone + Send + Sync + 'static> FromMessageParts<S> for Extension<T> {
    fn from_message_parts(req: &Request<Envelope>, _state: &S) -> Result<Self, HandlerError> {
        req.extensions()
            .get::<T>()
            .cloned()
            .map(Extension)
            .ok_or_else(|| {
                let wanted = TypeId::of::<T>();
                let hint = if wanted == TypeId::of::<TopicParams>() {
                    ": the topic parameters are not an extension; take `TopicParams` as a \
                     handler argument, or read `Request::topic_params`"
                } else if wanted == TypeId::of::<CorrelationId>() {
                    ": the correlation id is not an extension; take `CorrelationId` as a \
                     handler argument, or read `Request::correlation_id`"
                } else {
                    ""
                };
                HandlerError::permanent(format!(
                    "no {} in the extensions of the message on {}{hint}",
                    std::any::type_name::<T>(),
                    req.topic()
                ))
            })
    }
}

#[cfg(test)]
mod tests;
