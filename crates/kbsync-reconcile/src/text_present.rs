//! Which rows have text at all, in SQL: a row whose text is blank has no chunks, and
//! both the fingerprint pass and the key-by-key comparison must agree on that.

/// Characters Rust's `str::trim` removes (Unicode White_Space): a text made only of
/// them has no chunks, so a row with such a text is not "missing" its chunks.
const NON_BLANK: &str =
    r"'[^\u0009-\u000D\u0020\u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]'";

/// True when the text `text` (SQL) has a character that is not white space. The
/// regular expression costs ~0.3 us a row; a text that starts with a printable
/// ASCII character (almost all) is decided by its first character alone.
pub(crate) fn has_text(text: &str) -> String {
    format!("CASE WHEN ascii({text}) BETWEEN 33 AND 126 THEN true ELSE {text} ~ {NON_BLANK} END")
}
