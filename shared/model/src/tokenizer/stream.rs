//! Text of a generation as it grows: what can be printed after each token, and where a stop string ends it.

/// Turns the decoded text of a growing generation into printable pieces. Text that could still become a stop string
/// is held back until it cannot; an incomplete character (decoded as U+FFFD) waits for the bytes that complete it.
#[derive(Debug, Clone)]
pub struct TextStream {
    stops: Vec<String>,
    printed: usize,
    stopped: bool,
}

/// What a new token adds to the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStep {
    /// Text to print now.
    pub text: String,
    /// A stop string was reached: the text ends before it, and generation should stop.
    pub stopped: bool,
}

impl TextStream {
    /// A stream ending at the first of `stops` (empty strings ignored).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            printed: 0,
            stopped: false,
        }
    }

    /// Takes the whole decoded text so far and returns what is new and printable.
    pub fn push(&mut self, decoded: &str) -> StreamStep {
        if self.stopped {
            return StreamStep {
                text: String::new(),
                stopped: true,
            };
        }
        if let Some(at) = self.stops.iter().filter_map(|s| decoded.find(s.as_str())).min() {
            let text = self.take(decoded, at);
            self.stopped = true;
            return StreamStep { text, stopped: true };
        }
        // Byte-fallback tokenizers decode each byte of an unfinished character as its own U+FFFD.
        let end = decoded.trim_end_matches('\u{FFFD}').len();
        // Hold back the longest tail that begins some stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k)).map(move |k| &s[..k]))
            .filter(|p| decoded[..end].ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        StreamStep {
            text: self.take(decoded, end - hold),
            stopped: false,
        }
    }

    /// The rest of the text once generation has ended (nothing more after a stop string).
    pub fn finish(&mut self, decoded: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.take(decoded, decoded.len())
    }

    fn take(&mut self, decoded: &str, end: usize) -> String {
        // A decoder may rewrite earlier text (rare); print from where it still agrees, never twice.
        if end <= self.printed || !decoded.is_char_boundary(self.printed) || !decoded.is_char_boundary(end) {
            return String::new();
        }
        let piece = decoded[self.printed..end].to_string();
        self.printed = end;
        piece
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], growth: &[&str]) -> (String, bool) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for text in growth {
            let step = s.push(text);
            out += &step.text;
            if step.stopped {
                return (out, true);
            }
        }
        out += &s.finish(growth.last().copied().unwrap_or(""));
        (out, false)
    }

    #[test]
    fn nothing_follows_a_stop_string() {
        let mut s = TextStream::new(vec![" Paris".into()]);
        assert_eq!(s.push("It is").text, "It is");
        let step = s.push("It is Paris");
        assert_eq!((step.text.as_str(), step.stopped), ("", true));
        assert_eq!(s.push("It is Paris.").text, "");
        assert_eq!(
            s.finish("It is Paris."),
            "",
            "the stop string and what follows are never printed"
        );
    }

    #[test]
    fn text_is_printed_once_and_a_stop_string_ends_it_before_itself() {
        assert_eq!(
            run(&[], &["Hel", "Hello", "Hello,", "Hello, world"]),
            ("Hello, world".into(), false)
        );
        // "\n\nQ" arrives over three tokens; nothing of it is printed.
        let growth = ["A: 4", "A: 4\n", "A: 4\n\n", "A: 4\n\nQ", "A: 4\n\nQ: next"];
        assert_eq!(run(&["\n\nQ"], &growth), ("A: 4".into(), true));
        // A held-back prefix that turns out not to be a stop is printed once it cannot be one.
        assert_eq!(run(&["\n\nQ"], &["a\n", "a\nb"]), ("a\nb".into(), false));
        // The earliest of several stops wins.
        assert_eq!(run(&["END", "x"], &["ab xEND"]), ("ab ".into(), true));
    }

    #[test]
    fn an_incomplete_character_waits_for_its_bytes() {
        let mut s = TextStream::new(vec![]);
        assert_eq!(s.push("caf").text, "caf");
        assert_eq!(s.push("caf\u{FFFD}").text, "");
        assert_eq!(s.push("café").text, "é");
        assert_eq!(s.finish("café"), "");
        // A four-byte character arriving a byte at a time, one U+FFFD per byte so far.
        let mut s = TextStream::new(vec![]);
        for partial in ["a\u{FFFD}", "a\u{FFFD}\u{FFFD}", "a\u{FFFD}\u{FFFD}\u{FFFD}"] {
            assert!(!s.push(partial).text.contains('\u{FFFD}'));
        }
        assert_eq!(s.push("a😀").text, "😀");
        assert_eq!(s.push("a😀b").text, "b", "nothing after it is lost");
    }
}
