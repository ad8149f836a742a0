//! The event registry: which event type travels on which topic.
//!
//! The fleet pairs every event type with one topic (`stt.final` on `stt/final`).
//! A receiver needs the pairing when a service publishes a raw JSON object
//! instead of an envelope: [`Decode`](crate::decode::Decode) wraps the object in
//! an envelope whose `type` is the one registered for the topic. The pairing is
//! data the service registers, not code; [`EventRegistry::fleet`] is the fleet's
//! table.
//!
//! A pair whose type and topic both end in the same placeholder, such as
//! `system.health.<svc>` and `system/health/<svc>`, registers a family: the
//! placeholder stands for one topic level and is carried across.
//!
//! ```
//! use tower_mqtt::layers::EventRegistry;
//!
//! let registry = EventRegistry::new()
//!     .event("stt.final", "stt/final")
//!     .event("system.health.<svc>", "system/health/<svc>");
//!
//! assert_eq!(registry.event_type_for("stt/final").as_deref(), Some("stt.final"));
//! assert_eq!(registry.topic_for("stt.final").as_deref(), Some("stt/final"));
//! assert_eq!(
//!     registry.event_type_for("system/health/llm-worker").as_deref(),
//!     Some("system.health.llm-worker"),
//! );
//! assert_eq!(registry.event_type_for("camera/front"), None);
//! ```

use std::{borrow::Cow, collections::HashMap, fmt};

use tower_mqtt_core::TopicName;

/// Event type <-> topic pairs; see the [module docs](self).
///
/// Built once at start-up and shared (a [`Decode`](crate::decode::Decode)
/// keeps it behind an `Arc`).
///
/// ```
/// use tower_mqtt::layers::EventRegistry;
///
/// // The fleet's table plus a service's own events.
/// let registry = EventRegistry::fleet().event("camera.frame", "camera/frame");
/// assert_eq!(registry.topic_for("camera.frame").as_deref(), Some("camera/frame"));
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct EventRegistry {
    by_type: HashMap<String, String>,
    by_topic: HashMap<String, String>,
    families: Vec<Family>,
}

/// `type_prefix<x>` <-> `topic_prefix<x>`, `<x>` one topic level.
#[derive(Clone, Debug)]
struct Family {
    type_prefix: String,
    topic_prefix: String,
}

impl Family {
    fn topic_for(&self, event_type: &str) -> Option<String> {
        let level = event_type.strip_prefix(&self.type_prefix)?;
        is_level(level).then(|| format!("{}{level}", self.topic_prefix))
    }

    fn event_type_for(&self, topic: &str) -> Option<String> {
        let level = topic.strip_prefix(&self.topic_prefix)?;
        is_level(level).then(|| format!("{}{level}", self.type_prefix))
    }
}

/// One non-empty topic level without wildcards.
fn is_level(level: &str) -> bool {
    !level.is_empty() && !level.contains(['/', '+', '#', '\0'])
}

/// The placeholder a pattern ends in (`<svc>`), and the text before it.
fn split_placeholder(pattern: &str) -> Option<(&str, &str)> {
    let body = pattern.strip_suffix('>')?;
    let start = body.rfind('<')?;
    let name = &body[start + 1..];
    (!name.is_empty() && !name.contains(['<', '>'])).then(|| (&pattern[..start], name))
}

impl EventRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The fleet's table (docs/ARCHITECTURE.md, "The fleet's wire contract"):
    /// `stt.final` <-> `stt/final`, ..., `system.character.current` <->
    /// `system/character/current` and the family
    /// `system.health.<svc>` <-> `system/health/<svc>`.
    ///
    /// ```
    /// use tower_mqtt::layers::EventRegistry;
    ///
    /// let fleet = EventRegistry::fleet();
    /// assert_eq!(fleet.event_type_for("llm/stream").as_deref(), Some("llm.stream"));
    /// assert_eq!(fleet.topic_for("system.health.stt").as_deref(), Some("system/health/stt"));
    /// ```
    pub fn fleet() -> Self {
        [
            ("stt.final", "stt/final"),
            ("stt.partial", "stt/partial"),
            ("tts.say", "tts/say"),
            ("tts.status", "tts/status"),
            ("llm.request", "llm/request"),
            ("llm.response", "llm/response"),
            ("llm.stream", "llm/stream"),
            ("llm.cancel", "llm/cancel"),
            ("wake.event", "wake/event"),
            ("wake.mic", "wake/mic"),
            ("memory.query", "memory/query"),
            ("memory.results", "memory/results"),
            ("character.get", "character/get"),
            ("character.result", "character/result"),
            ("system.character.current", "system/character/current"),
            ("system.health.<svc>", "system/health/<svc>"),
        ]
        .into_iter()
        .fold(Self::new(), |registry, (event_type, topic)| {
            registry.event(event_type, topic)
        })
    }

    /// Registers `event_type` as travelling on `topic`.
    ///
    /// When both end in the same placeholder (`<svc>`), this registers a family:
    /// the placeholder matches one topic level. Exact pairs are looked up before
    /// families.
    ///
    /// # Panics
    ///
    /// When the topic is not a valid topic name (wildcards are not allowed), the
    /// placeholders do not match or do not stand for a whole last level, or the
    /// type or topic is already registered with a different partner. The message
    /// names the pair.
    ///
    /// ```should_panic
    /// use tower_mqtt::layers::EventRegistry;
    ///
    /// // panics: invalid event registration "stt.final" <-> "stt/+": ...
    /// EventRegistry::new().event("stt.final", "stt/+");
    /// ```
    #[track_caller]
    pub fn event(mut self, event_type: impl Into<String>, topic: impl Into<String>) -> Self {
        let (event_type, topic) = (event_type.into(), topic.into());
        if let Err(why) = self.register(&event_type, &topic) {
            panic!("invalid event registration {event_type:?} <-> {topic:?}: {why}");
        }
        self
    }

    fn register(&mut self, event_type: &str, topic: &str) -> Result<(), String> {
        if event_type.is_empty() {
            return Err("the event type is empty".into());
        }
        match (split_placeholder(event_type), split_placeholder(topic)) {
            (Some((type_prefix, a)), Some((topic_prefix, b))) => {
                if a != b {
                    return Err(format!("placeholders <{a}> and <{b}> differ"));
                }
                if !(type_prefix.is_empty() || type_prefix.ends_with('.')) {
                    return Err("the type placeholder must follow a '.'".into());
                }
                if !(topic_prefix.is_empty() || topic_prefix.ends_with('/')) {
                    return Err("the topic placeholder must be a whole level".into());
                }
                TopicName::new(format!("{topic_prefix}x")).map_err(|err| err.to_string())?;
                self.families.push(Family {
                    type_prefix: type_prefix.to_owned(),
                    topic_prefix: topic_prefix.to_owned(),
                });
                Ok(())
            }
            (None, None) => {
                TopicName::new(topic).map_err(|err| err.to_string())?;
                if let Some(other) = self.by_type.get(event_type).filter(|t| *t != topic) {
                    return Err(format!("the type is already registered for {other:?}"));
                }
                if let Some(other) = self.by_topic.get(topic).filter(|t| *t != event_type) {
                    return Err(format!("the topic is already registered for {other:?}"));
                }
                self.by_type.insert(event_type.to_owned(), topic.to_owned());
                self.by_topic
                    .insert(topic.to_owned(), event_type.to_owned());
                Ok(())
            }
            _ => Err("only one side has a placeholder".into()),
        }
    }

    /// The event type registered for `topic`.
    pub fn event_type_for(&self, topic: &str) -> Option<Cow<'_, str>> {
        if let Some(event_type) = self.by_topic.get(topic) {
            return Some(Cow::Borrowed(event_type));
        }
        self.families
            .iter()
            .find_map(|family| family.event_type_for(topic))
            .map(Cow::Owned)
    }

    /// The topic registered for `event_type`.
    pub fn topic_for(&self, event_type: &str) -> Option<Cow<'_, str>> {
        if let Some(topic) = self.by_type.get(event_type) {
            return Some(Cow::Borrowed(topic));
        }
        self.families
            .iter()
            .find_map(|family| family.topic_for(event_type))
            .map(Cow::Owned)
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty() && self.families.is_empty()
    }
}

impl fmt::Debug for EventRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut pairs: Vec<(&str, &str)> = self
            .by_type
            .iter()
            .map(|(t, topic)| (t.as_str(), topic.as_str()))
            .collect();
        pairs.sort_unstable();
        f.debug_struct("EventRegistry")
            .field("events", &pairs)
            .field("families", &self.families)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_table_round_trips() {
        let fleet = EventRegistry::fleet();
        for (event_type, topic) in [
            ("stt.final", "stt/final"),
            ("stt.partial", "stt/partial"),
            ("tts.say", "tts/say"),
            ("tts.status", "tts/status"),
            ("llm.request", "llm/request"),
            ("llm.response", "llm/response"),
            ("llm.stream", "llm/stream"),
            ("llm.cancel", "llm/cancel"),
            ("wake.event", "wake/event"),
            ("wake.mic", "wake/mic"),
            ("memory.query", "memory/query"),
            ("memory.results", "memory/results"),
            ("character.get", "character/get"),
            ("character.result", "character/result"),
            ("system.character.current", "system/character/current"),
            ("system.health.stt", "system/health/stt"),
            ("system.health.llm-worker", "system/health/llm-worker"),
        ] {
            assert_eq!(fleet.topic_for(event_type).as_deref(), Some(topic));
            assert_eq!(fleet.event_type_for(topic).as_deref(), Some(event_type));
        }
    }

    #[test]
    fn families_match_exactly_one_level() {
        let fleet = EventRegistry::fleet();
        assert_eq!(fleet.event_type_for("system/health"), None);
        assert_eq!(fleet.event_type_for("system/health/"), None);
        assert_eq!(fleet.event_type_for("system/health/a/b"), None);
        assert_eq!(fleet.topic_for("system.health."), None);
        assert_eq!(fleet.topic_for("system.health.a/b"), None);
        assert_eq!(fleet.topic_for("system.health.+"), None);
        assert_eq!(fleet.topic_for("unknown.type"), None);
    }

    #[test]
    fn exact_pairs_win_over_families() {
        let registry = EventRegistry::new()
            .event("system.health.<svc>", "system/health/<svc>")
            .event("fleet.health", "system/health/all");
        assert_eq!(
            registry.event_type_for("system/health/all").as_deref(),
            Some("fleet.health")
        );
        assert_eq!(
            registry.event_type_for("system/health/stt").as_deref(),
            Some("system.health.stt")
        );
    }

    #[test]
    fn registering_the_same_pair_twice_is_fine() {
        let registry = EventRegistry::new().event("a.b", "a/b").event("a.b", "a/b");
        assert_eq!(registry.topic_for("a.b").as_deref(), Some("a/b"));
        assert!(!registry.is_empty());
        assert!(EventRegistry::new().is_empty());
    }

    #[test]
    fn invalid_registrations_panic_with_the_pair() {
        let cases: &[(&str, &str, &str)] = &[
            ("a.b", "a/+", "wildcards"),
            ("a.b", "", "at least one character"),
            ("", "a/b", "empty"),
            ("a.<x>", "a/<y>", "differ"),
            ("a.<x>", "a/b", "one side"),
            ("a<x>", "a/<x>", "follow a '.'"),
            ("a.<x>", "a<x>", "whole level"),
        ];
        for &(event_type, topic, why) in cases {
            let err = std::panic::catch_unwind(|| EventRegistry::new().event(event_type, topic))
                .expect_err("must panic");
            let message = err.downcast_ref::<String>().unwrap();
            assert!(
                message.contains(&format!("{event_type:?} <-> {topic:?}")) && message.contains(why),
                "{message}"
            );
        }
    }

    #[test]
    fn conflicting_registrations_panic() {
        let result = std::panic::catch_unwind(|| {
            EventRegistry::new().event("a.b", "a/b").event("a.b", "a/c")
        });
        assert!(result.is_err());
        let result = std::panic::catch_unwind(|| {
            EventRegistry::new().event("a.b", "a/b").event("a.c", "a/b")
        });
        assert!(result.is_err());
    }
}
