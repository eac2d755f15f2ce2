//! Progress bars as tracing spans: the binaries' log layer (tracing-indicatif, set up by `offsite-cli`) draws them
//! and prints log lines above them instead of through them; `-q` (or any filter below `info`) hides them, and where
//! no such layer is installed (tests, other programs using this crate) they cost next to nothing.

use indicatif::ProgressStyle;
use tracing::Span;
use tracing_indicatif::span_ext::IndicatifSpanExt;

/// One progress bar, shown from its creation until it is dropped.
pub struct Progress {
    span: Span,
    position: u64,
}

impl Progress {
    /// A bar of `len` units at `position`, drawn with `label` before indicatif's template `body` (for example
    /// `"{bar:30} {pos}/{len} steps {msg} [{eta}]"`). Braces in `label` are shown as they are.
    pub fn new(label: &str, body: &str, len: u64, position: u64) -> Self {
        let span = tracing::info_span!("progress", indicatif.pb_show = tracing::field::Empty);
        let label = label.replace('{', "{{").replace('}', "}}");
        let template = if label.is_empty() {
            body.to_string()
        } else {
            format!("{label} {body}")
        };
        let style = ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar());
        span.pb_set_style(&style);
        span.pb_set_length(len);
        span.pb_set_position(position);
        span.pb_start();
        Self { span, position }
    }

    /// Moves the bar `delta` units on.
    pub fn inc(&mut self, delta: u64) {
        self.position += delta;
        self.span.pb_inc(delta);
    }

    /// Sets the bar's length and position (for work whose size is known only once it has started).
    pub fn set(&mut self, position: u64, len: u64) {
        self.position = position;
        self.span.pb_set_length(len);
        self.span.pb_set_position(position);
    }

    /// The text shown in the template's `{msg}`.
    pub fn message(&self, message: &str) {
        self.span.pb_set_message(message);
    }

    /// Units done so far.
    pub fn position(&self) -> u64 {
        self.position
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_counts_what_was_added_and_odd_labels_are_accepted() {
        let mut p = Progress::new("arm {x}", "{bar:30} {pos}/{len}", 10, 3);
        p.inc(2);
        assert_eq!(p.position(), 5);
        p.set(1, 4);
        p.inc(1);
        assert_eq!(p.position(), 2);
        p.message("loss 1.0");
    }
}
