//! Pre-splitting text into chunks before BPE ("pre-tokenization").
//!
//! The GPT-4 split pattern needs look-around and possessive quantifiers, so the general path runs
//! it through `fancy_regex`, which backtracks and is the usual bottleneck of BPE training. For the
//! GPT-4 family of patterns (the default one here, with numbers in groups of at most 2 digits, and
//! the original with 3) we instead run a hand-written scanner that makes the same decisions as the
//! regex, alternative by alternative, in one forward pass. Its character classes (\p{L}, \p{N},
//! \s) come from `regex-syntax`, the same Unicode tables the regex engines use, and a differential
//! test checks it against `fancy_regex` on adversarial strings.

use std::sync::OnceLock;

/// GPT-4's split pattern with numbers split in groups of at most 2 digits: with a 32K vocabulary,
/// spending tokens on all 1,110 one-to-three digit numbers is a poor trade.
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The original GPT-4 (cl100k) split pattern.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 4;

/// One byte of class bits per Unicode scalar value (1.1 MB, built once): a lookup beats a binary
/// search over ranges in the hot loop.
fn class_table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = vec![0u8; 0x110000];
        for (pattern, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            let hir = regex_syntax::Parser::new().parse(pattern).expect("static class pattern");
            let class = match hir.kind() {
                regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(c)) => c.clone(),
                _ => unreachable!("a \\p class parses to a Unicode class"),
            };
            for range in class.ranges() {
                for cp in range.start() as u32..=range.end() as u32 {
                    table[cp as usize] |= bit;
                }
            }
        }
        table
    })
}

#[inline]
fn class_of(table: &[u8], c: char) -> u8 {
    table[c as usize]
}

/// How text is cut into chunks: the fast scanner for GPT-4-style patterns, or a general regex.
pub enum Splitter {
    Gpt4Like { max_digits: usize },
    Regex(fancy_regex::Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        if pattern == DEFAULT_PATTERN {
            class_table();
            return Ok(Splitter::Gpt4Like { max_digits: 2 });
        }
        if pattern == GPT4_PATTERN {
            class_table();
            return Ok(Splitter::Gpt4Like { max_digits: 3 });
        }
        fancy_regex::Regex::new(pattern)
            .map(Splitter::Regex)
            .map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// Calls `emit` with each chunk of `text`, in order; the chunks concatenate back to `text`.
    pub fn split<'a>(&self, text: &'a str, mut emit: impl FnMut(&'a str)) -> Result<(), String> {
        match self {
            Splitter::Gpt4Like { max_digits } => {
                let table = class_table();
                let mut i = 0;
                while i < text.len() {
                    let end = gpt4_match_end(table, text, i, *max_digits);
                    emit(&text[i..end]);
                    i = end;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                // Text the pattern does not match is skipped, as tiktoken does.
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed on the input: {e}"))?;
                    emit(m.as_str());
                }
                Ok(())
            }
        }
    }
}

#[inline]
fn char_at(text: &str, i: usize) -> char {
    // Safety of the unwrap: callers only pass char boundaries inside the text.
    let b = text.as_bytes()[i];
    if b < 0x80 {
        b as char
    } else {
        text[i..].chars().next().unwrap()
    }
}

/// Byte offset where the GPT-4 pattern's match starting at `i` ends. The alternatives are tried in
/// the pattern's order; the first that matches wins (regex alternation is ordered, not longest).
fn gpt4_match_end(table: &[u8], text: &str, i: usize, max_digits: usize) -> usize {
    let n = text.len();
    let c = char_at(text, i);
    let c_end = i + c.len_utf8();
    let cls = class_of(table, c);

    // 1. '(?i:[sdmt]|ll|ve|re) — case-insensitive; U+017F (long s) folds to 's'.
    if c == '\'' && c_end < n {
        let c2 = char_at(text, c_end);
        let c2_end = c_end + c2.len_utf8();
        if matches!(c2, 's' | 'S' | '\u{17F}' | 'd' | 'D' | 'm' | 'M' | 't' | 'T') {
            return c2_end;
        }
        if c2_end < n {
            let c3 = char_at(text, c2_end);
            let pair = (c2.to_ascii_lowercase(), c3.to_ascii_lowercase());
            if c2.is_ascii() && c3.is_ascii() && matches!(pair, ('l', 'l') | ('v', 'e') | ('r', 'e')) {
                return c2_end + 1;
            }
        }
    }

    // 2. [^\r\n\p{L}\p{N}]?+\p{L}+ — letters, with at most one leading non-letter non-digit char.
    if cls & LETTER != 0 {
        return scan_while(table, text, c_end, LETTER);
    }
    if c != '\r' && c != '\n' && cls & NUMBER == 0 && c_end < n {
        let c2 = char_at(text, c_end);
        if class_of(table, c2) & LETTER != 0 {
            return scan_while(table, text, c_end + c2.len_utf8(), LETTER);
        }
    }

    // 3. \p{N}{1,max_digits}
    if cls & NUMBER != 0 {
        let mut j = c_end;
        for _ in 1..max_digits {
            if j >= n {
                break;
            }
            let d = char_at(text, j);
            if class_of(table, d) & NUMBER == 0 {
                break;
            }
            j += d.len_utf8();
        }
        return j;
    }

    // 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*` — punctuation run, optionally after one space, plus newlines.
    let start = if c == ' ' { c_end } else { i };
    if start < n {
        let p = char_at(text, start);
        if class_of(table, p) == 0 {
            let mut j = scan_while_not(table, text, start);
            while j < n && matches!(text.as_bytes()[j], b'\r' | b'\n') {
                j += 1;
            }
            return j;
        }
    }

    // Only whitespace is left here.
    debug_assert!(cls & SPACE != 0);
    let mut j = i;
    let mut after_last_newline = None;
    let mut last_char_start = i;
    while j < n {
        let w = char_at(text, j);
        if class_of(table, w) & SPACE == 0 {
            break;
        }
        last_char_start = j;
        j += w.len_utf8();
        if w == '\r' || w == '\n' {
            after_last_newline = Some(j);
        }
    }
    // 5. \s*[\r\n] — the whitespace up to and including the run's last newline.
    if let Some(end) = after_last_newline {
        return end;
    }
    // 6. \s+(?!\S) — the whole run at the end of text, else all of it but its last char, which
    //    then leads the next chunk (so " word" keeps its space).
    if j == n {
        return n;
    }
    if last_char_start > i {
        return last_char_start;
    }
    // 7. \s+ — a single whitespace char before a non-space.
    j
}

#[inline]
fn scan_while(table: &[u8], text: &str, mut j: usize, bit: u8) -> usize {
    let bytes = text.as_bytes();
    while j < bytes.len() {
        let b = bytes[j];
        if b < 0x80 {
            if table[b as usize] & bit == 0 {
                break;
            }
            j += 1;
        } else {
            let c = char_at(text, j);
            if class_of(table, c) & bit == 0 {
                break;
            }
            j += c.len_utf8();
        }
    }
    j
}

/// Scans characters that are neither letter, number nor whitespace.
#[inline]
fn scan_while_not(table: &[u8], text: &str, mut j: usize) -> usize {
    while j < text.len() {
        let c = char_at(text, j);
        if class_of(table, c) != 0 {
            break;
        }
        j += c.len_utf8();
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(splitter: &Splitter, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        splitter.split(text, |c| out.push(c.to_string())).unwrap();
        out
    }

    /// A tiny deterministic PRNG so the differential test needs no extra crate.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    const ALPHABET: &[char] = &[
        'a', 'b', 's', 'S', 't', 'l', 'L', 'v', 'e', 'r', 'R', 'd', 'm', 'M', 'x', '\'', '\u{17F}',
        '\u{212A}', ' ', ' ', ' ', '\t', '\n', '\r', '\u{A0}', '\u{3000}', '\u{2028}', '\u{85}', '0',
        '1', '9', '\u{663}', '\u{2163}', '\u{BD}', '.', ',', '!', '?', '-', '"', '(', '#', '$',
        '\u{4E2D}', '\u{6587}', '\u{D55C}', '\u{E9}', '\u{301}', '\u{1F600}', '\u{1F44D}',
        '\u{1F3FD}', '\u{200D}', '\u{FE0F}', '\u{10400}', '\u{1D7CE}', '\u{0}', '\u{7F}',
    ];

    #[test]
    fn fast_scanner_matches_fancy_regex_on_random_strings() {
        for pattern in [DEFAULT_PATTERN, GPT4_PATTERN] {
            let fast = Splitter::new(pattern).unwrap();
            assert!(matches!(fast, Splitter::Gpt4Like { .. }));
            let slow = Splitter::Regex(fancy_regex::Regex::new(pattern).unwrap());
            let mut rng = XorShift(0x9E3779B97F4A7C15);
            for _ in 0..20_000 {
                let len = (rng.next() % 24) as usize;
                let s: String = (0..len).map(|_| ALPHABET[(rng.next() as usize) % ALPHABET.len()]).collect();
                assert_eq!(chunks(&fast, &s), chunks(&slow, &s), "pattern {pattern:?} on {s:?}");
            }
        }
    }

    #[test]
    fn known_splits() {
        let s = Splitter::new(DEFAULT_PATTERN).unwrap();
        assert_eq!(chunks(&s, "Hello world's 12345!!\n\n  end"),
                   vec!["Hello", " world", "'s", " ", "12", "34", "5", "!!\n\n", " ", " end"]);
        assert_eq!(chunks(&s, "x  \n  y"), vec!["x", "  \n", " ", " y"]);
        let g = Splitter::new(GPT4_PATTERN).unwrap();
        assert_eq!(chunks(&g, "12345"), vec!["123", "45"]);
    }

    #[test]
    fn chunks_concatenate_to_the_input() {
        let s = Splitter::new(DEFAULT_PATTERN).unwrap();
        let text = "Der Bär  läuft\r\n\t 3.14159 — 你好，世界！ 🤖👍🏽 'LL 'Ve";
        assert_eq!(chunks(&s, text).concat(), text);
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        assert!(Splitter::new("(unclosed").is_err());
    }
}
