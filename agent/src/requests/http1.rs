//! One direction of an HTTP/1.x connection, parsed as it arrives: heads (`httparse`), then
//! bodies framed by Content-Length, chunked transfer coding, or the connection's end —
//! keep-alive and pipelined messages one after another. Bounded: a head is kept until it
//! is complete (at most [`MAX_HEAD`] bytes), a body never.
//!
//! The probes copy a bounded prefix of each read or write; what they did not copy arrives
//! as a gap of known length. A gap inside a Content-Length or chunk body is skipped; one
//! anywhere else loses the framing, and the stream is then given up ([`Trouble::Gap`]).

/// The longest head kept (cpp-httplib, uvicorn and Go's net/http allow 8–16 KiB).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers parsed in one head.
const MAX_HEADERS: usize = 64;
/// The longest path kept (the route label is matched from it, then it is dropped).
const MAX_PATH: usize = 256;

/// Which side of the exchange the stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// Why a stream was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trouble {
    /// Bytes the probes did not copy, where the framing needed them.
    Gap,
    /// A head longer than [`MAX_HEAD`].
    HeadTooLong,
    /// Not HTTP/1.x.
    Malformed,
    /// A TLS handshake: encrypted, out of reach.
    Tls,
    /// HTTP/2 (prior knowledge): out of reach.
    Http2,
    /// Switched protocols (WebSocket, h2c).
    Upgrade,
}

impl Trouble {
    pub const ALL: [Trouble; 6] = [
        Trouble::Gap,
        Trouble::HeadTooLong,
        Trouble::Malformed,
        Trouble::Tls,
        Trouble::Http2,
        Trouble::Upgrade,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Trouble::Gap => "gap",
            Trouble::HeadTooLong => "head_too_long",
            Trouble::Malformed => "malformed",
            Trouble::Tls => "tls",
            Trouble::Http2 => "http2",
            Trouble::Upgrade => "upgrade",
        }
    }
}

/// How a body's bytes are encoded, from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `text/event-stream`: `data:` events (OpenAI-style streaming, llama.cpp).
    EventStream,
    /// `application/x-ndjson` (Ollama's streaming).
    Ndjson,
    Json,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path, without its query, at most [`MAX_PATH`] bytes.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub body: BodyKind,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Request(RequestHead),
    Response(ResponseHead),
    /// Body bytes, decoded from their transfer coding.
    Body(&'a [u8]),
    /// Body bytes the probes did not copy.
    BodyGap(u64),
    /// The message is complete.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the size line: its value so far; `ext` after a `;`.
    Size {
        value: u64,
        digits: u8,
        ext: bool,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one; `empty` while the line is.
    Trailer {
        empty: bool,
    },
    TrailerLf {
        empty: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Broken(Trouble),
}

#[derive(Debug)]
pub struct Stream {
    side: Side,
    state: State,
    head: Vec<u8>,
    /// Bytes of "\r\n\r\n" matched at the end of `head`.
    matched: u8,
    /// For a response stream: whether each request awaiting its response was a HEAD (its
    /// response has no body). Pushed by the connection, one per request.
    head_requests: std::collections::VecDeque<bool>,
}

impl Stream {
    pub fn new(side: Side) -> Self {
        Stream {
            side,
            state: State::Head,
            head: Vec::new(),
            matched: 0,
            head_requests: std::collections::VecDeque::new(),
        }
    }

    /// Why the stream was given up, if it was.
    pub fn trouble(&self) -> Option<Trouble> {
        match self.state {
            State::Broken(t) => Some(t),
            _ => None,
        }
    }

    /// Between messages: the next byte starts one.
    pub fn between_messages(&self) -> bool {
        self.state == State::Head && self.head.is_empty()
    }

    /// A request was read whose response comes on this stream (`head`: it was a HEAD).
    /// Bounded by the connection's limit on requests in flight.
    pub fn expect_response(&mut self, head: bool) {
        self.head_requests.push_back(head);
    }

    /// Feeds one read or write: `data` is what the probe copied of the `len` bytes moved.
    pub fn feed(&mut self, data: &[u8], len: u64, out: &mut impl FnMut(Event<'_>)) {
        let mut rest = data;
        while !rest.is_empty() {
            rest = match self.state {
                State::Broken(_) => return,
                State::Head => self.head_bytes(rest, out),
                State::Length(n) => {
                    let take = rest.len().min(n.min(usize::MAX as u64) as usize);
                    out(Event::Body(&rest[..take]));
                    self.state = State::Length(n - take as u64);
                    if n == take as u64 {
                        self.end(out);
                    }
                    &rest[take..]
                }
                State::Chunked(c) => self.chunked(c, rest, out),
                State::UntilClose => {
                    out(Event::Body(rest));
                    &[]
                }
            };
        }
        let gap = len.saturating_sub(data.len() as u64);
        if gap > 0 {
            self.gap(gap, out);
        }
    }

    /// The connection closed: a body that runs until then is complete.
    pub fn close(&mut self, out: &mut impl FnMut(Event<'_>)) {
        if self.state == State::UntilClose {
            self.end(out);
        }
    }

    fn gap(&mut self, gap: u64, out: &mut impl FnMut(Event<'_>)) {
        match self.state {
            State::Length(n) if gap <= n => {
                out(Event::BodyGap(gap));
                self.state = State::Length(n - gap);
                if n == gap {
                    self.end(out);
                }
            }
            State::Chunked(Chunk::Data(n)) if gap <= n => {
                out(Event::BodyGap(gap));
                self.state = State::Chunked(if n == gap {
                    Chunk::DataCr
                } else {
                    Chunk::Data(n - gap)
                });
            }
            State::UntilClose => out(Event::BodyGap(gap)),
            State::Broken(_) => {}
            _ => self.state = State::Broken(Trouble::Gap),
        }
    }

    fn end(&mut self, out: &mut impl FnMut(Event<'_>)) {
        out(Event::End);
        self.state = State::Head;
    }

    /// Head bytes until the blank line; returns what follows it.
    fn head_bytes<'d>(&mut self, data: &'d [u8], out: &mut impl FnMut(Event<'_>)) -> &'d [u8] {
        for (i, &b) in data.iter().enumerate() {
            // Empty lines before a request line are allowed (RFC 9112 §2.2).
            if self.head.is_empty() && (b == b'\r' || b == b'\n') {
                continue;
            }
            if self.head.is_empty() {
                if let Some(t) = foreign(b) {
                    self.state = State::Broken(t);
                    return &[];
                }
            }
            if self.head.len() == MAX_HEAD {
                self.state = State::Broken(Trouble::HeadTooLong);
                return &[];
            }
            self.head.push(b);
            self.matched = match (self.matched, b) {
                (0 | 2, b'\r') => self.matched + 1,
                (1 | 3, b'\n') => self.matched + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
            if self.matched == 4 {
                self.matched = 0;
                let head = std::mem::take(&mut self.head);
                self.parse_head(&head, out);
                self.head = head;
                self.head.clear();
                return &data[i + 1..];
            }
        }
        &[]
    }

    fn parse_head(&mut self, head: &[u8], out: &mut impl FnMut(Event<'_>)) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match self.side {
            Side::Request => {
                if head.starts_with(b"PRI * HTTP/2") {
                    self.state = State::Broken(Trouble::Http2);
                    return;
                }
                let mut req = httparse::Request::new(&mut headers);
                let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
                    self.state = State::Broken(Trouble::Malformed);
                    return;
                };
                let (Some(method), Some(target)) = (req.method, req.path) else {
                    self.state = State::Broken(Trouble::Malformed);
                    return;
                };
                let path = target.split(['?', '#']).next().unwrap_or_default();
                let path = match path.char_indices().nth(MAX_PATH) {
                    Some((cut, _)) => &path[..cut],
                    None => path,
                };
                let framing = framing(req.headers);
                out(Event::Request(RequestHead {
                    method: method.chars().take(16).collect(),
                    path: path.to_owned(),
                }));
                match framing {
                    Some(State::Length(0)) | None => self.end(out),
                    Some(state) => self.state = state,
                }
            }
            Side::Response => {
                let mut res = httparse::Response::new(&mut headers);
                let Ok(httparse::Status::Complete(_)) = res.parse(head) else {
                    self.state = State::Broken(Trouble::Malformed);
                    return;
                };
                let status = res.code.unwrap_or(0);
                if status == 101 {
                    self.state = State::Broken(Trouble::Upgrade);
                    return;
                }
                if (100..200).contains(&status) {
                    // Interim (100 Continue): the real response follows.
                    return;
                }
                let was_head = self.head_requests.pop_front().unwrap_or(false);
                out(Event::Response(ResponseHead {
                    status,
                    body: body_kind(res.headers),
                }));
                let bodiless = was_head || status == 204 || status == 304;
                match framing(res.headers) {
                    _ if bodiless => self.end(out),
                    Some(State::Length(0)) => self.end(out),
                    Some(state) => self.state = state,
                    None => self.state = State::UntilClose,
                }
            }
        }
    }

    fn chunked<'d>(
        &mut self,
        mut c: Chunk,
        data: &'d [u8],
        out: &mut impl FnMut(Event<'_>),
    ) -> &'d [u8] {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            c = match c {
                Chunk::Data(n) => {
                    // At least one byte (a chunk of 0 is the last one, never Data).
                    let take = (data.len() - i).min(n.min(usize::MAX as u64) as usize);
                    out(Event::Body(&data[i..i + take]));
                    i += take - 1;
                    if n == take as u64 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(n - take as u64)
                    }
                }
                Chunk::Size { value, digits, ext } => match b {
                    b'\r' if digits > 0 => Chunk::SizeLf { value },
                    b';' | b' ' | b'\t' if digits > 0 => Chunk::Size {
                        value,
                        digits,
                        ext: true,
                    },
                    _ if ext => Chunk::Size { value, digits, ext },
                    _ => match (b as char).to_digit(16) {
                        // 15 hex digits: a chunk can announce up to 2^60 bytes.
                        Some(d) if digits < 15 => Chunk::Size {
                            value: value << 4 | u64::from(d),
                            digits: digits + 1,
                            ext,
                        },
                        _ => return self.broken(Trouble::Malformed),
                    },
                },
                Chunk::SizeLf { value } => match b {
                    b'\n' if value == 0 => Chunk::Trailer { empty: true },
                    b'\n' => Chunk::Data(value),
                    _ => return self.broken(Trouble::Malformed),
                },
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::Size {
                    value: 0,
                    digits: 0,
                    ext: false,
                },
                Chunk::DataCr | Chunk::DataLf => return self.broken(Trouble::Malformed),
                Chunk::Trailer { empty } => match b {
                    b'\r' => Chunk::TrailerLf { empty },
                    _ => Chunk::Trailer { empty: false },
                },
                Chunk::TrailerLf { empty } => match b {
                    b'\n' if empty => {
                        i += 1;
                        self.end(out);
                        return &data[i..];
                    }
                    b'\n' => Chunk::Trailer { empty: true },
                    _ => return self.broken(Trouble::Malformed),
                },
            };
            self.state = State::Chunked(c);
            i += 1;
        }
        &[]
    }

    fn broken(&mut self, trouble: Trouble) -> &'static [u8] {
        self.state = State::Broken(trouble);
        &[]
    }
}

/// A first byte that says the stream is not HTTP/1 in clear text.
fn foreign(first: u8) -> Option<Trouble> {
    match first {
        // A TLS record of type handshake.
        0x16 => Some(Trouble::Tls),
        b'A'..=b'Z' => None,
        _ => Some(Trouble::Malformed),
    }
}

fn header<'h>(headers: &'h [httparse::Header<'_>], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The body's framing from the head (RFC 9112 §6.3): chunked wins over a length; None: no
/// framing header.
fn framing(headers: &[httparse::Header<'_>]) -> Option<State> {
    if let Some(te) = header(headers, "transfer-encoding") {
        let chunked = te
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return Some(if chunked {
            State::Chunked(Chunk::Size {
                value: 0,
                digits: 0,
                ext: false,
            })
        } else {
            State::UntilClose
        });
    }
    let length = header(headers, "content-length")?;
    Some(
        std::str::from_utf8(length)
            .ok()
            .and_then(|l| l.trim().parse::<u64>().ok())
            .map_or(State::Broken(Trouble::Malformed), State::Length),
    )
}

fn body_kind(headers: &[httparse::Header<'_>]) -> BodyKind {
    let Some(ct) = header(headers, "content-type") else {
        return BodyKind::Other;
    };
    let essence = ct
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    let is = |name: &[u8]| essence.eq_ignore_ascii_case(name);
    if is(b"text/event-stream") {
        BodyKind::EventStream
    } else if is(b"application/x-ndjson") || is(b"application/jsonl") {
        BodyKind::Ndjson
    } else if is(b"application/json") {
        BodyKind::Json
    } else {
        BodyKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of `pieces` (data, extra uncopied bytes), bodies joined.
    fn run(side: Side, pieces: &[(&[u8], u64)]) -> (Vec<String>, Option<Trouble>) {
        let mut s = Stream::new(side);
        let mut events: Vec<String> = Vec::new();
        for &(data, extra) in pieces {
            s.feed(data, data.len() as u64 + extra, &mut |e| {
                let text = match e {
                    Event::Request(h) => format!("{} {}", h.method, h.path),
                    Event::Response(h) => format!("{} {:?}", h.status, h.body),
                    Event::Body(b) => format!("body {}", String::from_utf8_lossy(b)),
                    Event::BodyGap(n) => format!("gap {n}"),
                    Event::End => "end".into(),
                };
                match (events.last_mut(), text.strip_prefix("body ")) {
                    (Some(last), Some(more)) if last_is_body(last) => last.push_str(more),
                    _ => events.push(text),
                }
            });
        }
        s.close(&mut |e| {
            if e == Event::End {
                events.push("end".into());
            }
        });
        (events, s.trouble())
    }

    fn last_is_body(s: &str) -> bool {
        s.starts_with("body ")
    }

    #[test]
    fn pipelined_keep_alive_requests_in_any_split() {
        let wire: &[u8] = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n{\"model\":1}\
GET /health HTTP/1.1\r\n\r\n\
POST /completion HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nTrailer: x\r\n\r\n";
        let want = vec![
            "POST /v1/chat/completions",
            "body {\"model\":1}",
            "end",
            "GET /health",
            "end",
            "POST /completion",
            "body abcdef",
            "end",
        ];
        for cut in 0..wire.len() {
            let (events, trouble) = run(Side::Request, &[(&wire[..cut], 0), (&wire[cut..], 0)]);
            assert_eq!(events, want, "cut at {cut}");
            assert_eq!(trouble, None);
        }
    }

    #[test]
    fn responses_by_their_framing() {
        let (events, _) = run(
            Side::Response,
            &[(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n0\r\n\r\n", 0),
              (b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}", 0),
              (b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n{\"done\":true}\n", 0)],
        );
        assert_eq!(
            events,
            vec![
                "200 EventStream",
                "body data: ",
                "end",
                "404 Json",
                "body {}",
                "end",
                "200 Ndjson",
                "body {\"done\":true}\n",
                "end"
            ]
        );
    }

    #[test]
    fn a_head_request_and_204_have_no_body() {
        let mut s = Stream::new(Side::Response);
        s.expect_response(true);
        s.expect_response(false);
        let mut events = Vec::new();
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        s.feed(wire, wire.len() as u64, &mut |e| {
            events.push(format!("{e:?}"));
        });
        assert_eq!(
            events.iter().filter(|e| *e == "End").count(),
            2,
            "{events:?}"
        );
        assert_eq!(s.trouble(), None);
    }

    #[test]
    fn gaps_are_skipped_inside_bodies_only() {
        // A 10-byte body of which the probe copied 4 bytes, then the next request.
        let (events, trouble) = run(
            Side::Request,
            &[
                (b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabcd", 6),
                (b"GET /b HTTP/1.1\r\n\r\n", 0),
            ],
        );
        assert_eq!(
            events,
            vec!["POST /a", "body abcd", "gap 6", "end", "GET /b", "end"]
        );
        assert_eq!(trouble, None);
        let (_, trouble) = run(Side::Request, &[(b"POST /a HTTP/1.1\r\nContent-Le", 100)]);
        assert_eq!(trouble, Some(Trouble::Gap));
        let (_, trouble) = run(
            Side::Request,
            &[(b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nab", 5)],
        );
        assert_eq!(trouble, Some(Trouble::Gap), "a gap past the body");
    }

    #[test]
    fn foreign_and_broken_streams_are_given_up() {
        let cases: [(&[u8], Side, Trouble); 7] = [
            (b"\x16\x03\x01\x02\x00", Side::Request, Trouble::Tls),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                Side::Request,
                Trouble::Http2,
            ),
            (b"\x00\x01garbage", Side::Request, Trouble::Malformed),
            (
                b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                Side::Request,
                Trouble::Malformed,
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                Side::Response,
                Trouble::Upgrade,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                Side::Response,
                Trouble::Malformed,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
                Side::Response,
                Trouble::Malformed,
            ),
        ];
        for (wire, side, want) in cases {
            assert_eq!(
                run(side, &[(wire, 0)]).1,
                Some(want),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(
            run(Side::Request, &[(long.as_bytes(), 0)]).1,
            Some(Trouble::HeadTooLong)
        );
    }

    #[test]
    fn a_body_until_close_ends_at_close() {
        let (events, _) = run(
            Side::Response,
            &[
                (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":",
                    0,
                ),
                (b"1}", 3),
            ],
        );
        assert_eq!(events, vec!["200 Json", "body {\"a\":1}", "gap 3", "end"]);
    }
}
