//! Validated topic names and topic filters (MQTT 3.1.1 section 4.7).
//!
//! A [`TopicName`] is what a message is published to: no wildcards. A
//! [`TopicFilter`] is what a subscription asks for: `+` matches exactly one level,
//! `#` matches the rest of the topic (including the parent level itself).
//! Both are checked once, when they are built, so the rest of the crate can rely
//! on them.
//!
//! Matching follows the specification's two easily forgotten rules:
//! - topics starting with `$` (such as `$SYS/...`) are not matched by a filter
//!   whose first level is a wildcard;
//! - a shared subscription `$share/<group>/<filter>` matches with the part after
//!   the group.
//!
//! ```
//! use tower_mqtt::{TopicFilter, TopicName};
//!
//! let filter = TopicFilter::new("camera/+/frame").unwrap();
//! let topic = TopicName::new("camera/front/frame").unwrap();
//! assert!(filter.matches(&topic));
//!
//! let params = filter.captures(&topic).unwrap();
//! assert_eq!(params.get(0), Some("front"));
//!
//! assert!(TopicFilter::new("sport/tennis#").is_err());
//! assert!(!TopicFilter::new("#").unwrap().matches(&TopicName::new("$SYS/uptime").unwrap()));
//! ```

use std::{fmt, ops::Range, str::FromStr, sync::Arc};

/// The longest topic the protocol can carry: its length is a 16-bit prefix.
const MAX_TOPIC_LEN: usize = 65_535;

/// Why a topic name or topic filter was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The string was empty; the specification requires at least one character.
    #[error("a topic must be at least one character long")]
    Empty,
    /// Longer than 65535 bytes of UTF-8.
    #[error("a topic must be at most 65535 bytes, this one is {0} bytes")]
    TooLong(usize),
    /// Contained the NUL character, which the specification forbids.
    #[error("a topic must not contain the NUL character")]
    Nul,
    /// A topic name (where messages are published) contained `+` or `#`.
    #[error("the topic name {0:?} contains a wildcard; wildcards are only allowed in filters")]
    WildcardInName(String),
    /// `#` was not alone in the last level, or `+` not alone in its level.
    #[error("invalid wildcard in topic filter {filter:?}: {reason}")]
    InvalidWildcard {
        /// The filter as given.
        filter: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A `$share/<group>/<filter>` without a valid group or filter.
    #[error("invalid shared subscription {0:?}: expected $share/<group>/<filter>")]
    InvalidShare(String),
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(s.len()));
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// A topic a message is published to: non-empty, no wildcards, no NUL, at most
/// 65535 bytes.
///
/// Cheap to clone (a shared string).
///
/// ```
/// use tower_mqtt::TopicName;
///
/// let topic: TopicName = "llm/request".parse().unwrap();
/// assert_eq!(topic.as_str(), "llm/request");
/// assert_eq!(topic.levels().collect::<Vec<_>>(), ["llm", "request"]);
/// assert!(TopicName::new("llm/+").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

impl TopicName {
    /// Validates `name` as a topic name.
    pub fn new(name: impl AsRef<str>) -> Result<Self, TopicError> {
        let name = name.as_ref();
        check_common(name)?;
        if name.contains(['+', '#']) {
            return Err(TopicError::WildcardInName(name.to_owned()));
        }
        Ok(Self(name.into()))
    }

    /// The topic as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The levels of the topic, split on `/` (empty levels included).
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.0.split('/')
    }

    /// Whether this is a `$`-topic (such as `$SYS/...`), which leading wildcards
    /// do not match.
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TopicName {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for TopicName {
    type Error = TopicError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for TopicName {
    type Error = TopicError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl AsRef<str> for TopicName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for TopicName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for TopicName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

/// A subscription filter: a topic whose levels may be `+` (exactly one level) or,
/// as the last level, `#` (any number of levels, including none).
///
/// Cheap to clone. `$share/<group>/<filter>` is accepted; it matches with the
/// part after the group (see [`TopicFilter::share_group`]).
///
/// ```
/// use tower_mqtt::{TopicFilter, TopicName};
///
/// let all_health = TopicFilter::new("system/health/#").unwrap();
/// assert!(all_health.matches(&TopicName::new("system/health/stt").unwrap()));
/// assert!(all_health.matches(&TopicName::new("system/health").unwrap()));
///
/// let shared = TopicFilter::new("$share/workers/llm/request").unwrap();
/// assert_eq!(shared.share_group(), Some("workers"));
/// assert!(shared.matches(&TopicName::new("llm/request").unwrap()));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter {
    full: Arc<str>,
    /// Byte offset where the matching part starts (after `$share/<group>/`).
    pattern_start: usize,
}

impl TopicFilter {
    /// Validates `filter` as a topic filter.
    pub fn new(filter: impl AsRef<str>) -> Result<Self, TopicError> {
        let filter = filter.as_ref();
        check_common(filter)?;
        let pattern_start = match filter.strip_prefix("$share/") {
            Some(rest) => {
                let (group, pattern) = rest
                    .split_once('/')
                    .ok_or_else(|| TopicError::InvalidShare(filter.to_owned()))?;
                if group.is_empty() || group.contains(['+', '#']) || pattern.is_empty() {
                    return Err(TopicError::InvalidShare(filter.to_owned()));
                }
                "$share/".len() + group.len() + 1
            }
            None => 0,
        };
        let pattern = &filter[pattern_start..];
        let mut levels = pattern.split('/').peekable();
        while let Some(level) = levels.next() {
            let is_last = levels.peek().is_none();
            if level.contains('#') && (level != "#" || !is_last) {
                return Err(TopicError::InvalidWildcard {
                    filter: filter.to_owned(),
                    reason: "`#` must be the last level and alone in it",
                });
            }
            if level.contains('+') && level != "+" {
                return Err(TopicError::InvalidWildcard {
                    filter: filter.to_owned(),
                    reason: "`+` must be alone in its level",
                });
            }
        }
        Ok(Self {
            full: filter.into(),
            pattern_start,
        })
    }

    /// The filter exactly as given (including any `$share/<group>/` prefix); this
    /// is what is sent to the broker.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The part that topics are matched against: the filter without any
    /// `$share/<group>/` prefix.
    pub fn pattern(&self) -> &str {
        &self.full[self.pattern_start..]
    }

    /// The group of a shared subscription, if this is one.
    pub fn share_group(&self) -> Option<&str> {
        if self.pattern_start == 0 {
            None
        } else {
            Some(&self.full["$share/".len()..self.pattern_start - 1])
        }
    }

    /// Whether the filter contains `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.pattern().contains(['+', '#'])
    }

    /// Whether `topic` matches this filter.
    pub fn matches(&self, topic: &TopicName) -> bool {
        self.match_levels(topic, |_| {})
    }

    /// The values of the filter's wildcards in `topic`, or `None` when it does not
    /// match. Each `+` contributes the level it matched; a trailing `#` contributes
    /// the rest of the topic (possibly empty).
    pub fn captures(&self, topic: &TopicName) -> Option<TopicParams> {
        let mut inline = [(0, 0); INLINE_SPANS];
        let mut len: u8 = 0;
        let mut more = Vec::new();
        let matched = self.match_levels(topic, |span| {
            let span = (to_u16(span.start), to_u16(span.end));
            if usize::from(len) < INLINE_SPANS {
                inline[usize::from(len)] = span;
                len += 1;
            } else {
                if more.is_empty() {
                    more.extend_from_slice(&inline);
                }
                more.push(span);
            }
        });
        let spans = if more.is_empty() {
            Spans::Inline { len, spans: inline }
        } else {
            Spans::Heap(more.into())
        };
        matched.then(|| TopicParams {
            topic: topic.0.clone(),
            spans,
        })
    }

    /// Whether every topic matched by `other` is also matched by `self`.
    ///
    /// The runtime uses this to avoid overlapping subscriptions, for which MQTT
    /// 3.1.1 lets a broker deliver one copy per matching subscription.
    ///
    /// ```
    /// use tower_mqtt::TopicFilter;
    ///
    /// let wide = TopicFilter::new("sensors/#").unwrap();
    /// let narrow = TopicFilter::new("sensors/+/temp").unwrap();
    /// assert!(wide.covers(&narrow));
    /// assert!(!narrow.covers(&wide));
    /// ```
    pub fn covers(&self, other: &TopicFilter) -> bool {
        let mine: Vec<&str> = self.pattern().split('/').collect();
        let theirs: Vec<&str> = other.pattern().split('/').collect();
        // `$` topics are only reachable through a literal first level, so a
        // leading wildcard cannot cover a filter that names a `$` level.
        if let (Some(&first_mine), Some(&first_theirs)) = (mine.first(), theirs.first()) {
            if (first_mine == "+" || first_mine == "#")
                && (first_theirs.starts_with('$') && first_theirs != "+" && first_theirs != "#")
            {
                return false;
            }
        }
        for (i, level) in mine.iter().enumerate() {
            match *level {
                // `a/#` covers `a` too, so `#` covers whatever remains of `other`.
                "#" => return true,
                "+" => match theirs.get(i) {
                    Some(&"#") | None => return false,
                    Some(_) => {}
                },
                literal => match theirs.get(i) {
                    Some(t) if *t == literal => {}
                    _ => return false,
                },
            }
        }
        mine.len() == theirs.len()
    }

    /// Whether `topic` matches, calling `capture` with the byte range of
    /// every wildcard's value in order.
    fn match_levels(&self, topic: &TopicName, mut capture: impl FnMut(Range<usize>)) -> bool {
        let pattern = self.pattern();
        if topic.is_system() && (pattern.starts_with('+') || pattern.starts_with('#')) {
            return false;
        }
        let topic = topic.as_str();
        let end = topic.len();
        // Where the unmatched rest of the topic starts; `None` once the last
        // level has been matched.
        let mut rest = Some(0);
        for level in pattern.split('/') {
            if level == "#" {
                // The rest of the topic, or nothing when `#` matches the parent.
                capture(rest.unwrap_or(end)..end);
                return true;
            }
            let Some(start) = rest else {
                return false;
            };
            let (head_end, next) = match topic.as_bytes()[start..].iter().position(|&b| b == b'/') {
                Some(slash) => (start + slash, Some(start + slash + 1)),
                None => (end, None),
            };
            if level == "+" {
                capture(start..head_end);
            } else if level != &topic[start..head_end] {
                return false;
            }
            rest = next;
        }
        rest.is_none()
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.full, f)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl FromStr for TopicFilter {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for TopicFilter {
    type Error = TopicError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<String> for TopicFilter {
    type Error = TopicError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<TopicName> for TopicFilter {
    fn from(name: TopicName) -> Self {
        // A valid name is a valid filter without wildcards; only the `$share`
        // prefix needs parsing again.
        Self::new(name.as_str()).unwrap_or(Self {
            full: name.0,
            pattern_start: 0,
        })
    }
}

/// The values a topic gave to a filter's wildcards, in order.
///
/// The [`Router`](crate::Router) sets them on the request it hands a route
/// ([`Request::topic_params`](crate::Request::topic_params)), and a handler
/// takes them as an argument, so a handler for `camera/+/frame` can read the
/// camera id (or take it parsed, with [`Wildcard`](crate::extract::Wildcard)):
///
/// ```
/// use tower_mqtt::TopicParams;
///
/// async fn on_frame(params: TopicParams) {
///     let camera = params.get(0);
///     println!("frame from {camera:?}");
/// }
/// ```
///
/// They are not in the request's extensions: `Extension<TopicParams>` fails
/// the message, with a message that says where they are.
#[derive(Clone, Default)]
pub struct TopicParams {
    /// The topic the values are slices of.
    topic: Arc<str>,
    spans: Spans,
}

impl TopicParams {
    /// The value of the `index`-th wildcard.
    pub fn get(&self, index: usize) -> Option<&str> {
        self.spans
            .as_slice()
            .get(index)
            .map(|&(start, end)| &self.topic[usize::from(start)..usize::from(end)])
    }

    /// How many wildcards the filter had.
    pub fn len(&self) -> usize {
        self.spans.as_slice().len()
    }

    /// Whether the filter had no wildcards.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.spans
            .as_slice()
            .iter()
            .map(|&(start, end)| &self.topic[usize::from(start)..usize::from(end)])
    }
}

impl PartialEq for TopicParams {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for TopicParams {}

impl fmt::Debug for TopicParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TopicParams")
            .field(&self.iter().collect::<Vec<_>>())
            .finish()
    }
}

/// How many wildcard values a [`TopicParams`] holds without an allocation of
/// its own: routing a message allocates nothing for them.
const INLINE_SPANS: usize = 4;

/// Byte ranges of the wildcard values in the topic; a topic has at most
/// 65,535 bytes (`MAX_TOPIC_LEN`), so an offset fits in a `u16`.
#[derive(Clone)]
enum Spans {
    Inline {
        len: u8,
        spans: [(u16, u16); INLINE_SPANS],
    },
    Heap(Arc<[(u16, u16)]>),
}

impl Default for Spans {
    fn default() -> Self {
        Self::Inline {
            len: 0,
            spans: [(0, 0); INLINE_SPANS],
        }
    }
}

impl Spans {
    fn as_slice(&self) -> &[(u16, u16)] {
        match self {
            Self::Inline { len, spans } => &spans[..usize::from(*len)],
            Self::Heap(spans) => spans,
        }
    }
}

/// A byte offset into a validated topic as `u16`.
fn to_u16(offset: usize) -> u16 {
    u16::try_from(offset).expect("a topic has at most 65,535 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }

    #[test]
    fn validity_table() {
        // Examples from MQTT 3.1.1 sections 4.7.1 and 4.7.3.
        for valid in [
            "sport/tennis/player1/#",
            "sport/#",
            "#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "/+",
            "+/+",
            "sport/+",
            "$share/g/sport/#",
            "/",
            "a//b",
        ] {
            assert!(
                TopicFilter::new(valid).is_ok(),
                "{valid} should be a valid filter"
            );
        }
        for invalid in [
            "sport/tennis#",
            "sport/tennis/#/ranking",
            "sport+",
            "sport/+x",
            "",
            "a\0b",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
        ] {
            assert!(
                TopicFilter::new(invalid).is_err(),
                "{invalid:?} should be an invalid filter"
            );
        }
        assert_eq!(TopicName::new(""), Err(TopicError::Empty));
        assert_eq!(TopicName::new("a\0"), Err(TopicError::Nul));
        assert!(matches!(
            TopicName::new("a/+"),
            Err(TopicError::WildcardInName(_))
        ));
        assert!(matches!(
            TopicName::new("a/#"),
            Err(TopicError::WildcardInName(_))
        ));
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            TopicName::new(&long),
            Err(TopicError::TooLong(MAX_TOPIC_LEN + 1))
        );
        assert!(TopicName::new("a".repeat(MAX_TOPIC_LEN)).is_ok());
    }

    #[test]
    fn matching_table() {
        let cases = [
            // (filter, topic, matches)
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/#", "sport", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player2", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("#", "$SYS/uptime", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/monitor/Clients", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
            ("#", "anything/at/all", true),
            ("llm/request", "llm/request", true),
            ("llm/request", "llm/requests", false),
            ("llm/request", "llm", false),
            ("$share/g/llm/+", "llm/request", true),
            ("$share/g/#", "$SYS/x", false),
            ("a//b", "a//b", true),
            ("a/+/b", "a//b", true),
        ];
        for (f, t, expected) in cases {
            assert_eq!(
                filter(f).matches(&name(t)),
                expected,
                "filter {f:?} against topic {t:?}"
            );
        }
    }

    #[test]
    fn captures_wildcard_values() {
        let params = filter("camera/+/frame")
            .captures(&name("camera/7/frame"))
            .unwrap();
        assert_eq!(params.iter().collect::<Vec<_>>(), ["7"]);
        let params = filter("a/+/#").captures(&name("a/b/c/d")).unwrap();
        assert_eq!(params.iter().collect::<Vec<_>>(), ["b", "c/d"]);
        let params = filter("a/#").captures(&name("a")).unwrap();
        assert_eq!(params.iter().collect::<Vec<_>>(), [""]);
        assert!(filter("a/b").captures(&name("a/b")).unwrap().is_empty());
        assert!(filter("a/+").captures(&name("b/c")).is_none());
    }

    #[test]
    fn captures_past_the_inline_ones() {
        let params = filter("+/+/+/+/+/#")
            .captures(&name("a/b/c/d/e/f/g"))
            .unwrap();
        assert_eq!(params.len(), 6);
        assert_eq!(
            params.iter().collect::<Vec<_>>(),
            ["a", "b", "c", "d", "e", "f/g"]
        );
        assert_eq!(params.get(4), Some("e"));
        assert_eq!(params.get(6), None);
    }

    #[test]
    fn captures_at_the_edges() {
        let long = format!("a/{}", "x".repeat(MAX_TOPIC_LEN - 2));
        for (f, topic, expected) in [
            ("a/+/b", "a//b", Some(vec![""])),
            ("a/+", "a/", Some(vec![""])),
            ("+/a", "/a", Some(vec![""])),
            ("a/#", "a", Some(vec![""])),
            ("a/#", "a/", Some(vec![""])),
            ("#", "$SYS/x", None),
            ("+/x", "$SYS/x", None),
            ("$SYS/#", "$SYS/x/y", Some(vec!["x/y"])),
            ("+/é/+", "ü/é/ß", Some(vec!["ü", "ß"])),
            ("a/#", long.as_str(), Some(vec![&long[2..]])),
            ("a/b", "a/b/c", None),
            ("a/b/c", "a/b", None),
        ] {
            let params = filter(f).captures(&name(topic));
            assert_eq!(
                params.as_ref().map(|p| p.iter().collect::<Vec<_>>()),
                expected,
                "{f} on {topic:.20}"
            );
            assert_eq!(params.is_some(), filter(f).matches(&name(topic)));
        }
    }

    #[test]
    fn params_compare_and_print_by_value() {
        let one = filter("x/+").captures(&name("x/7")).unwrap();
        let other = filter("+/y").captures(&name("7/y")).unwrap();
        assert_eq!(one, other);
        assert_ne!(one, filter("x/+").captures(&name("x/8")).unwrap());
        assert_eq!(format!("{one:?}"), r#"TopicParams(["7"])"#);
        assert!(TopicParams::default().is_empty());
    }

    #[test]
    fn share_group_and_pattern() {
        let f = filter("$share/workers/llm/#");
        assert_eq!(f.share_group(), Some("workers"));
        assert_eq!(f.pattern(), "llm/#");
        assert_eq!(f.as_str(), "$share/workers/llm/#");
        assert_eq!(filter("llm/#").share_group(), None);
    }

    #[test]
    fn covers_table() {
        let cases = [
            ("a/#", "a/b", true),
            ("a/#", "a", true),
            ("a/#", "a/+/c", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a/#", false),
            ("a/b", "a/+", false),
            ("#", "$SYS/x", false),
            ("#", "+/x", true),
            ("+/x", "$SYS/x", false),
            ("a/+/c", "a/b/+", false),
            ("a/b", "a/b", true),
        ];
        for (a, b, expected) in cases {
            assert_eq!(filter(a).covers(&filter(b)), expected, "{a} covers {b}");
        }
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-c$]{1,2}".prop_map(|s| s),]
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("topics are non-empty", |t| !t.is_empty())
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![level(), Just("+".to_owned())], 1..5),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#".to_owned());
                }
                levels.join("/")
            })
            .prop_filter("filters are non-empty", |f| !f.is_empty())
    }

    /// A straightforward restatement of the rules, to check the matcher against.
    fn reference_match(filter: &str, topic: &str) -> bool {
        if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
            return false;
        }
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        for (i, level) in f.iter().enumerate() {
            if *level == "#" {
                return t.len() >= i;
            }
            match t.get(i) {
                Some(tl) if *level == "+" || level == tl => {}
                _ => return false,
            }
        }
        f.len() == t.len()
    }

    proptest! {
        #[test]
        fn matcher_agrees_with_reference(f in filter_strategy(), t in topic_strategy()) {
            let fl = TopicFilter::new(&f).unwrap();
            let tn = TopicName::new(&t).unwrap();
            prop_assert_eq!(fl.matches(&tn), reference_match(&f, &t));
            // A filter without wildcards matches exactly its own topic.
            prop_assert!(TopicFilter::from(tn.clone()).matches(&tn));
        }

        #[test]
        fn covering_is_sound(a in filter_strategy(), b in filter_strategy(), t in topic_strategy()) {
            let (fa, fb) = (TopicFilter::new(&a).unwrap(), TopicFilter::new(&b).unwrap());
            let tn = TopicName::new(&t).unwrap();
            if fa.covers(&fb) && fb.matches(&tn) {
                prop_assert!(fa.matches(&tn), "{a} covers {b} but misses {t}");
            }
        }

        #[test]
        fn arbitrary_strings_never_panic(s in "\\PC{0,40}") {
            let _ = TopicFilter::new(&s);
            let _ = TopicName::new(&s);
        }
    }
}
