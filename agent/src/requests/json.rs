//! Picks a few scalar fields out of a JSON document fed in pieces, without keeping the
//! document: a request's `model`, a response's token counts. A prompt or a completion is
//! never copied — string values are buffered only for the fields asked for, up to
//! [`MAX_VALUE`] bytes — and a document cut short (the probe copied a prefix) still yields
//! the fields before the cut.
//!
//! Fields are named by their key and their parent object's key (`""` at the top level), two
//! levels deep at most: `("usage", "completion_tokens")`, `("", "model")`. A key is only ever
//! a key: inside a JSON string every `"` is escaped, so no text of a prompt can pose as one.

/// The longest string value kept; a longer one is dropped (not truncated).
pub const MAX_VALUE: usize = 128;
/// The longest key compared; longer keys match nothing.
const MAX_KEY: usize = 32;
/// Object levels whose keys are tracked (deeper levels are only counted).
const LEVELS: usize = 2;
/// Deeper nesting than this stops the scan (no legitimate request nests so deep).
const MAX_DEPTH: u32 = 256;

/// A field asked for: (parent key or `""`, key).
pub type Path = (&'static str, &'static str);

/// A scalar value found.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Num(n) if n >= 0.0 && n.fract() == 0.0 && n < 1e15 => Some(n as u64),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between tokens.
    Between,
    /// In a string; `escape` after a backslash; `key` when the string is an object key.
    Str { escape: bool, key: bool },
    /// In a number or a literal (true, false, null).
    Scalar,
}

#[derive(Debug, Clone, Copy, Default)]
struct Key {
    bytes: [u8; MAX_KEY],
    len: u8,
    /// Longer than MAX_KEY: matches nothing.
    long: bool,
}

impl Key {
    fn is(&self, name: &str) -> bool {
        !self.long && &self.bytes[..self.len as usize] == name.as_bytes()
    }
}

/// The scanner's state between pieces.
#[derive(Debug, Clone)]
pub struct Scanner {
    wanted: &'static [Path],
    depth: u32,
    /// Whether each tracked level is an object (else an array).
    objects: [bool; LEVELS],
    /// The current member's key at each tracked object level.
    keys: [Key; LEVELS],
    /// In an object, before its next key.
    expect_key: bool,
    mode: Mode,
    /// The key being read, or the wanted value being read (string or scalar).
    token: Vec<u8>,
    /// The value being read is wanted (its index in `wanted`).
    capture: Option<usize>,
    overflow: bool,
    stopped: bool,
}

impl Scanner {
    pub fn new(wanted: &'static [Path]) -> Self {
        Scanner {
            wanted,
            depth: 0,
            objects: [false; LEVELS],
            keys: [Key::default(); LEVELS],
            expect_key: false,
            mode: Mode::Between,
            token: Vec::new(),
            capture: None,
            overflow: false,
            stopped: false,
        }
    }

    /// Starts over on a new document with the same fields.
    pub fn reset(&mut self) {
        *self = Scanner::new(self.wanted);
    }

    /// Stops scanning this document (its rest was not copied: its framing is lost).
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// Scans `piece`, calling `found(index into wanted, value)` for each wanted field.
    pub fn feed(&mut self, piece: &[u8], found: &mut impl FnMut(usize, Value)) {
        for &b in piece {
            if self.stopped {
                return;
            }
            self.byte(b, found);
        }
    }

    /// The document ended: a number at its very end is complete now.
    pub fn finish(&mut self, found: &mut impl FnMut(usize, Value)) {
        if self.mode == Mode::Scalar {
            self.end_scalar(found);
        }
    }

    fn byte(&mut self, b: u8, found: &mut impl FnMut(usize, Value)) {
        match self.mode {
            Mode::Str { escape: true, key } => {
                self.mode = Mode::Str { escape: false, key };
                self.keep(b);
            }
            Mode::Str { escape: false, key } => match b {
                b'\\' => {
                    self.mode = Mode::Str { escape: true, key };
                    self.keep(b);
                }
                b'"' => {
                    self.mode = Mode::Between;
                    if key {
                        self.end_key();
                    } else if let Some(i) = self.capture.take() {
                        if !self.overflow {
                            let s = unescape(&self.token);
                            found(i, Value::Str(s));
                        }
                    }
                    self.token.clear();
                }
                _ => self.keep(b),
            },
            Mode::Scalar if is_scalar_byte(b) => self.keep(b),
            Mode::Scalar => {
                self.end_scalar(found);
                self.between(b);
            }
            Mode::Between => self.between(b),
        }
    }

    fn between(&mut self, b: u8) {
        match b {
            b'{' | b'[' => {
                if self.depth >= MAX_DEPTH {
                    self.stopped = true;
                    return;
                }
                if let Some(level) = self.level_of(self.depth + 1) {
                    self.objects[level] = b == b'{';
                    self.keys[level] = Key::default();
                }
                self.depth += 1;
                self.expect_key = b == b'{';
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                self.expect_key = false;
            }
            b',' => self.expect_key = self.in_object(),
            b'"' => {
                let key = self.expect_key && self.in_object();
                self.mode = Mode::Str { escape: false, key };
                self.token.clear();
                self.overflow = false;
                if !key {
                    self.capture = self.wanted_here();
                }
            }
            b if is_scalar_byte(b) => {
                self.mode = Mode::Scalar;
                self.token.clear();
                self.overflow = false;
                self.capture = self.wanted_here();
                self.keep(b);
            }
            _ => {}
        }
    }

    /// Keeps a byte of a key (always, up to MAX_KEY + 1) or of a wanted value.
    fn keep(&mut self, b: u8) {
        let limit = match self.mode {
            Mode::Str { key: true, .. } => MAX_KEY + 1,
            _ if self.capture.is_some() => MAX_VALUE,
            _ => return,
        };
        if self.token.len() < limit {
            self.token.push(b);
        } else {
            self.overflow = true;
        }
    }

    fn end_key(&mut self) {
        if let Some(level) = self.level_of(self.depth) {
            let long = self.token.len() > MAX_KEY;
            let mut key = Key {
                long,
                ..Key::default()
            };
            if !long {
                key.bytes[..self.token.len()].copy_from_slice(&self.token);
                key.len = self.token.len() as u8;
            }
            self.keys[level] = key;
        }
        self.expect_key = false;
    }

    fn end_scalar(&mut self, found: &mut impl FnMut(usize, Value)) {
        self.mode = Mode::Between;
        if let Some(i) = self.capture.take() {
            let value = match self.token.as_slice() {
                b"true" => Some(Value::Bool(true)),
                b"false" => Some(Value::Bool(false)),
                b"null" => Some(Value::Null),
                t => std::str::from_utf8(t)
                    .ok()
                    .and_then(|t| t.parse::<f64>().ok())
                    .filter(|n| n.is_finite())
                    .map(Value::Num),
            };
            if let (Some(v), false) = (value, self.overflow) {
                found(i, v);
            }
        }
        self.token.clear();
    }

    /// The tracked level (0-based) of nesting depth `depth` (1 = the top object).
    fn level_of(&self, depth: u32) -> Option<usize> {
        (depth as usize).checked_sub(1).filter(|&l| l < LEVELS)
    }

    fn in_object(&self) -> bool {
        self.level_of(self.depth).is_some_and(|l| self.objects[l]) || self.depth as usize > LEVELS
    }

    /// Which wanted field the value starting now is, if any.
    fn wanted_here(&self) -> Option<usize> {
        let level = self.level_of(self.depth)?;
        if !self.objects[level] {
            return None;
        }
        let parent_ok = |parent: &str| match level {
            0 => parent.is_empty(),
            _ => self.objects[0] && self.keys[0].is(parent),
        };
        self.wanted
            .iter()
            .position(|&(parent, key)| parent_ok(parent) && self.keys[level].is(key))
    }
}

fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')
}

/// The common escapes undone; `\u` escapes and invalid UTF-8 become U+FFFD (a model name
/// is sanitised afterwards anyway).
fn unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter().copied();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'u') => {
                bytes.by_ref().take(4).for_each(drop);
                out.extend_from_slice("\u{FFFD}".as_bytes());
            }
            Some(c) => out.push(c),
            None => {}
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: &[Path] = &[
        ("", "model"),
        ("", "stream"),
        ("usage", "completion_tokens"),
        ("usage", "prompt_tokens"),
        ("", "eval_count"),
    ];

    fn scan(pieces: &[&[u8]]) -> Vec<(usize, Value)> {
        let mut s = Scanner::new(WANTED);
        let mut out = Vec::new();
        for p in pieces {
            s.feed(p, &mut |i, v| out.push((i, v)));
        }
        s.finish(&mut |i, v| out.push((i, v)));
        out
    }

    #[test]
    fn finds_top_level_and_nested_fields() {
        let doc = br#"{"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "usage": {"prompt_tokens": 12, "completion_tokens": 34}, "eval_count": 7}"#;
        assert_eq!(
            scan(&[doc]),
            vec![
                (0, Value::Str("llama-3.1-8b".into())),
                (1, Value::Bool(true)),
                (3, Value::Num(12.0)),
                (2, Value::Num(34.0)),
                (4, Value::Num(7.0)),
            ]
        );
    }

    #[test]
    fn any_split_gives_the_same_fields() {
        let doc = br#"{"usage":{"prompt_tokens":12,"completion_tokens":345},"model":"m\"x"}"#;
        let whole = scan(&[doc]);
        assert_eq!(whole.len(), 3);
        for cut in 0..doc.len() {
            assert_eq!(scan(&[&doc[..cut], &doc[cut..]]), whole, "cut at {cut}");
        }
        assert_eq!(whole[2], (0, Value::Str("m\"x".into())));
    }

    #[test]
    fn text_never_poses_as_a_key() {
        // A prompt that contains a key-like text, and a nested object with the same key.
        let doc = br#"{"messages":[{"content":"\"model\": \"evil\", \"usage\": {\"completion_tokens\": 999}"}],
            "tools":[{"parameters":{"model":"nested"}}],"options":{"model":"deeper"},"model":"real"}"#;
        assert_eq!(scan(&[doc]), vec![(0, Value::Str("real".into()))]);
    }

    #[test]
    fn a_cut_document_gives_what_came_before_the_cut() {
        let doc = br#"{"model":"m1","messages":[{"content":"long text that was not copi"#;
        assert_eq!(scan(&[doc]), vec![(0, Value::Str("m1".into()))]);
    }

    #[test]
    fn long_values_and_keys_are_dropped_and_deep_nesting_stops() {
        let long = format!(
            r#"{{"model":"{}","stream":false}}"#,
            "x".repeat(MAX_VALUE + 1)
        );
        assert_eq!(scan(&[long.as_bytes()]), vec![(1, Value::Bool(false))]);
        let deep = "[".repeat(10_000);
        assert_eq!(scan(&[deep.as_bytes()]), vec![]);
        assert_eq!(scan(&[b"[DONE]", b"", b"\xff\xfe{"]), vec![]);
    }

    #[test]
    fn numbers_convert_only_when_they_are_counts() {
        assert_eq!(Value::Num(42.0).as_u64(), Some(42));
        assert_eq!(Value::Num(-1.0).as_u64(), None);
        assert_eq!(Value::Num(1.5).as_u64(), None);
        assert_eq!(Value::Str("3".into()).as_u64(), None);
    }
}
