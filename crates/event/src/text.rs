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

/// Whether `c` can break or reorder a line as a terminal or a log viewer shows it:
/// control characters (newlines, escape sequences), the Unicode line and paragraph
/// separators, and the bidirectional overrides and isolates.
pub fn breaks_lines(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` for a log line or a message, whatever it holds: characters that
/// [break lines](breaks_lines) escaped (`\u{a}`), cut after `max_chars` characters with
/// `…`. For strings that come
/// from input (source IDs, settings keys) and must not forge or stretch log lines.
pub fn escape_clip(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars * 2));
    for (n, c) in s.chars().enumerate() {
        if n == max_chars {
            out.push('…');
            break;
        }
        if breaks_lines(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_clip_keeps_input_to_one_bounded_line() {
        assert_eq!(escape_clip("src_1", 10), "src_1");
        assert_eq!(escape_clip("a\nb\x1b[31m", 20), "a\\u{a}b\\u{1b}[31m");
        assert_eq!(
            escape_clip("a\u{2028}b\u{202e}c", 20),
            "a\\u{2028}b\\u{202e}c"
        );
        assert_eq!(escape_clip("é".repeat(5).as_str(), 3), "ééé…");
    }

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
