//! Byte offsets to line numbers, and deserializing one section at a time so that every problem
//! is reported with its line and one bad section does not hide the next.

use serde::Deserialize;
use toml::de::{DeValue, ValueDeserializer};
use toml::Spanned;

use super::Problem;

/// The line of a section header such as `[nats]` in config text, or 1 when it is absent.
pub(crate) fn section_line(text: &str, header: &str) -> usize {
    LineIndex::new(text).find_line(header)
}

/// Byte offsets → 1-based line numbers, and the per-section deserialization that uses them.
pub(super) struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { text, starts }
    }

    pub(super) fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|s| *s <= offset).max(1)
    }

    /// Line of a section header such as `[nats]`, or 1 when the section is absent.
    pub(super) fn find_line(&self, header: &str) -> usize {
        self.text
            .lines()
            .position(|l| l.trim_start().starts_with(header))
            .map_or(1, |i| i + 1)
    }

    pub(super) fn problem_from_toml(&self, e: &toml::de::Error, section: &str) -> Problem {
        let line = e.span().map_or(1, |s| self.line(s.start));
        let message = e.message().trim().replace('\n', " ");
        Problem {
            line,
            message: format!("{section}: {message}"),
        }
    }

    pub(super) fn section<T: for<'de> Deserialize<'de>>(
        &self,
        value: Spanned<DeValue<'_>>,
        name: &str,
        problems: &mut Vec<Problem>,
    ) -> Option<T> {
        if !matches!(value.get_ref(), DeValue::Table(_)) {
            problems.push(Problem {
                line: self.line(value.span().start),
                message: format!("{name} must be a table"),
            });
            return None;
        }
        T::deserialize(ValueDeserializer::from(value))
            .map_err(|e| problems.push(self.problem_from_toml(&e, name)))
            .ok()
    }

    /// The entries of an array of tables such as `[[mqtt]]`, each parsed and given its line;
    /// entries with problems are left out (the problems are reported).
    pub(super) fn entries<T: for<'de> Deserialize<'de>>(
        &self,
        value: Spanned<DeValue<'_>>,
        name: &str,
        problems: &mut Vec<Problem>,
        set_line: fn(&mut T, usize),
    ) -> Vec<T> {
        let mut out = Vec::new();
        for (line, item) in self.array(value, name, problems) {
            if let Some(mut entry) = self.section::<T>(item, name, problems) {
                set_line(&mut entry, line);
                out.push(entry);
            }
        }
        out
    }

    pub(super) fn array<'i>(
        &self,
        value: Spanned<DeValue<'i>>,
        name: &str,
        problems: &mut Vec<Problem>,
    ) -> Vec<(usize, Spanned<DeValue<'i>>)> {
        let line = self.line(value.span().start);
        match value.into_inner() {
            DeValue::Array(items) => items
                .into_iter()
                .map(|item| (self.line(item.span().start), item))
                .collect(),
            _ => {
                problems.push(Problem {
                    line,
                    message: format!("{name} must be an array of tables (write it as {name})"),
                });
                Vec::new()
            }
        }
    }
}
