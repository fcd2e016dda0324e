//! Text shown to people: characters that can make text read differently
//! from what it is.
//!
//! Bidirectional overrides and isolates (the "Trojan Source" characters)
//! reorder what a terminal or browser displays; zero-width and other
//! invisible format characters hide text; control characters move the
//! cursor or recolour a terminal. Plugin metadata containing any of them is
//! refused at load ([`is_deceptive`]); wherever stored text is displayed,
//! [`neutralize`] shows them as visible `\u{…}` escapes.

use std::borrow::Cow;

/// Bidirectional formatting: marks, embeddings, overrides and isolates.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Invisible format characters: soft hyphen, zero-width characters, word
/// joiner and invisible operators, the byte-order mark, interlinear
/// annotations, tag characters, line and paragraph separators.
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200D}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{2060}'..='\u{2064}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// A character that can make displayed text differ from the stored text:
/// a control character, a bidirectional control or an invisible format
/// character.
pub fn is_deceptive(c: char) -> bool {
    c.is_control() || is_bidi_control(c) || is_invisible_format(c)
}

/// `s` with every deceptive character except newline and tab replaced by a
/// visible `\u{XXXX}` escape (borrowed when there is none).
pub fn neutralize(s: &str) -> Cow<'_, str> {
    let hidden = |c: char| c != '\n' && c != '\t' && is_deceptive(c);
    if !s.chars().any(hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if hidden(c) {
            out.push_str(&format!("\\u{{{:04X}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_and_invisibles_are_shown_escaped() {
        assert_eq!(neutralize("plain text\nline two"), "plain text\nline two");
        assert_eq!(neutralize("safe\u{202E}gpj.exe"), "safe\\u{202E}gpj.exe");
        assert_eq!(
            neutralize("a\u{200B}b\u{1B}[31m"),
            "a\\u{200B}b\\u{001B}[31m"
        );
        assert_eq!(neutralize("tag\u{E0041}"), "tag\\u{E0041}");
        for c in [
            '\u{202E}', '\u{2066}', '\u{200F}', '\u{FEFF}', '\u{7}', '\u{85}',
        ] {
            assert!(is_deceptive(c), "{:04X}", c as u32);
        }
        for c in ['a', 'é', 'ש', 'ع', '中', ' '] {
            assert!(!is_deceptive(c), "{c}");
        }
    }
}
