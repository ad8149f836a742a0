//! The match index: which routes a message's topic can match, found without
//! trying every route's filter.

use std::collections::HashMap;

use crate::topic::{TopicFilter, TopicName};

/// Routes by the first level of their filter, so a message is matched only
/// against routes that can match it: those whose first level is its own,
/// and those that start with a wildcard.
#[derive(Debug, Default)]
pub(super) struct RouteIndex {
    by_first_level: HashMap<Box<str>, Vec<usize>>,
    wildcard_first: Vec<usize>,
}

impl RouteIndex {
    pub(super) fn new<'a>(filters: impl Iterator<Item = &'a TopicFilter>) -> Self {
        let mut index = Self::default();
        for (i, filter) in filters.enumerate() {
            let first = filter.pattern().split('/').next().unwrap_or_default();
            if first == "+" || first == "#" {
                index.wildcard_first.push(i);
            } else {
                index
                    .by_first_level
                    .entry(first.into())
                    .or_default()
                    .push(i);
            }
        }
        index
    }

    /// The routes `topic` can match, in route order, without allocating:
    /// the two ascending lists merged.
    pub(super) fn candidates(&self, topic: &TopicName) -> impl Iterator<Item = usize> + '_ {
        let first = topic.as_str().split('/').next().unwrap_or_default();
        let literal = self
            .by_first_level
            .get(first)
            .map_or(&[][..], Vec::as_slice);
        let (mut literal, mut wildcard) = (
            literal.iter().copied().peekable(),
            self.wildcard_first.iter().copied().peekable(),
        );
        std::iter::from_fn(move || match (literal.peek(), wildcard.peek()) {
            (Some(l), Some(w)) if l < w => literal.next(),
            (Some(_), Some(_)) | (None, _) => wildcard.next(),
            (Some(_), None) => literal.next(),
        })
    }
}
