//! Text for people: error lines, log fields and headers that must stay one line and
//! bounded whatever the input put into them.

/// Longest [`one_line`] text, in characters (then cut, with `…`).
pub const ONE_LINE_MAX_CHARS: usize = 500;

/// `s` as one line: control characters (newlines, tabs) and runs of white space become
/// one space, the ends are trimmed, and past [`ONE_LINE_MAX_CHARS`] it is cut with `…`.
pub fn one_line(s: &str) -> String {
    let flat = s
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    match flat.char_indices().nth(ONE_LINE_MAX_CHARS) {
        Some((i, _)) => format!("{}…", &flat[..i]),
        None => flat,
    }
}

/// The first `max_chars` characters of `s` (all of it when shorter), for quoting input
/// in a message without letting it grow the message.
pub fn clip(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_flattens_folds_and_caps() {
        assert_eq!(one_line("a\nb\tc"), "a b c");
        assert_eq!(one_line("  a \r\n\n  b\u{0}c "), "a b c");
        let long = one_line(&"x".repeat(600));
        assert_eq!(long.chars().count(), ONE_LINE_MAX_CHARS + 1);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn clip_counts_characters_not_bytes() {
        assert_eq!(clip("héllo", 2), "hé");
        assert_eq!(clip("hi", 10), "hi");
        assert_eq!(clip("", 3), "");
    }
}
