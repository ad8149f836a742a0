//! A small tracing layer that records events with their spans, for tests.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex},
};

use tracing::{
    field::{Field, Visit},
    span, Event, Level, Subscriber,
};
use tracing_subscriber::{layer::Context, prelude::*, registry::LookupSpan, Layer};

type Fields = BTreeMap<String, String>;

#[derive(Default)]
struct Visitor(Fields);

impl Visit for Visitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

#[derive(Clone, Debug)]
struct SpanData {
    name: &'static str,
    level: Level,
    fields: Fields,
}

/// One recorded event.
#[derive(Clone, Debug)]
pub(crate) struct Captured {
    pub(crate) level: Level,
    pub(crate) fields: Fields,
    spans: Vec<SpanData>,
}

impl Captured {
    /// The fields of the enclosing span called `name`.
    pub(crate) fn span(&self, name: &str) -> Option<&Fields> {
        self.spans
            .iter()
            .find(|s| s.name == name)
            .map(|s| &s.fields)
    }

    /// The level of the enclosing span called `name`.
    pub(crate) fn span_level(&self, name: &str) -> Option<Level> {
        self.spans.iter().find(|s| s.name == name).map(|s| s.level)
    }

    /// The event's message.
    pub(crate) fn message(&self) -> &str {
        self.fields.get("message").map_or("", String::as_str)
    }
}

/// The events recorded so far.
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<Vec<Captured>>>);

impl Logs {
    pub(crate) fn events(&self) -> Vec<Captured> {
        self.0.lock().unwrap().clone()
    }

    /// The recorded events at `level`.
    pub(crate) fn at(&self, level: Level) -> Vec<Captured> {
        self.events()
            .into_iter()
            .filter(|event| event.level == level)
            .collect()
    }
}

impl<S> Layer<S> for Logs
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut visitor = Visitor::default();
        attrs.record(&mut visitor);
        let span = ctx.span(id).expect("new span");
        span.extensions_mut().insert(SpanData {
            name: attrs.metadata().name(),
            level: *attrs.metadata().level(),
            fields: visitor.0,
        });
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let mut visitor = Visitor::default();
        values.record(&mut visitor);
        let span = ctx.span(id).expect("recorded span");
        let mut extensions = span.extensions_mut();
        if let Some(data) = extensions.get_mut::<SpanData>() {
            data.fields.extend(visitor.0);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut visitor = Visitor::default();
        event.record(&mut visitor);
        let spans = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .filter_map(|span| span.extensions().get::<SpanData>().cloned())
                    .collect()
            })
            .unwrap_or_default();
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            fields: visitor.0,
            spans,
        });
    }
}

/// Records every event on this thread until the guard is dropped.
pub(crate) fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::registry().with(logs.clone());
    (logs, tracing::subscriber::set_default(subscriber))
}
