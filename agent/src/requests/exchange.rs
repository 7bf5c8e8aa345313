//! One accepted connection of an inference server: its request stream and its response
//! stream, paired into exchanges in order (HTTP/1.1 answers in request order, pipelined or
//! not), each measured — route, model, status, time to the first response byte and to the
//! last, and tokens — and handed on when its response ends. What is read of a body is
//! scanned for a few fields and dropped at once.

use std::collections::VecDeque;

use super::http1::{BodyKind, Event, Side, Stream, Trouble};
use super::json::{Path, Scanner, Value};

/// Most requests read whose responses have not ended, per connection (pipelining depth).
pub const MAX_IN_FLIGHT: usize = 64;

/// The inference routes measured (`gen_ai` metrics); anything else is only counted.
const ROUTES: &[&str] = &[
    // OpenAI-compatible (vLLM, SGLang, TGI, llama.cpp, LocalAI, Ollama, LiteLLM).
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/rerank",
    // Ollama.
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    // llama.cpp's own.
    "/completion",
    "/completions",
    "/chat/completions",
    "/embedding",
    "/embeddings",
    "/infill",
    "/rerank",
    "/reranking",
    // TGI's own.
    "/generate",
    "/generate_stream",
];

const REQUEST_FIELDS: &[Path] = &[("", "model"), ("", "stream")];

/// Response fields carrying token counts, best first within each kind.
const RESPONSE_FIELDS: &[Path] = &[
    // OpenAI `usage` (and the Responses / Anthropic spelling).
    ("usage", "completion_tokens"),
    ("usage", "output_tokens"),
    // llama.cpp: `timings`, and its native /completion fields.
    ("timings", "predicted_n"),
    ("", "tokens_predicted"),
    // Ollama's final object.
    ("", "eval_count"),
    ("usage", "prompt_tokens"),
    ("usage", "input_tokens"),
    ("timings", "prompt_n"),
    ("", "tokens_evaluated"),
    ("", "prompt_eval_count"),
];
/// Indices into RESPONSE_FIELDS: the output counts, then the input counts.
const OUTPUT: std::ops::Range<usize> = 0..5;
const INPUT: std::ops::Range<usize> = 5..10;

/// Where an output token count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenSource {
    /// The server said it (usage, timings, eval_count).
    Server,
    /// Counted stream events (SSE `data:` events or NDJSON lines): an estimate.
    Chunks,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Server => "server",
            TokenSource::Chunks => "chunks",
        }
    }
}

/// An exchange whose response ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    pub route: &'static str,
    /// From the request's JSON body, raw (sanitise before using it as a label).
    pub model: Option<String>,
    pub status: u16,
    /// The response was a stream (SSE or NDJSON).
    pub streamed: bool,
    /// From the request's first byte read to the response's last byte written, ns.
    pub duration_ns: u64,
    /// From the request's first byte to the response's first body byte, ns.
    pub first_byte_ns: Option<u64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<(u64, TokenSource)>,
}

/// What a connection's bytes produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// An exchange on an inference route ended.
    Completed(Completed),
    /// An exchange on another route (health checks, /metrics) ended.
    Other,
    /// A stream was given up: nothing more is read of this connection.
    GaveUp(Trouble),
    /// A request arrived while [`MAX_IN_FLIGHT`] were waiting: dropped.
    Overflow,
}

#[derive(Debug)]
struct Exchange {
    route: Option<&'static str>,
    started: u64,
    model: Option<String>,
    status: u16,
    body: BodyKind,
    first_byte: Option<u64>,
    /// The last value of each RESPONSE_FIELDS entry.
    fields: [Option<u64>; RESPONSE_FIELDS.len()],
    /// Stream events (SSE data events, NDJSON lines) that carried something.
    events: u64,
    /// The response's body scan (the whole body for JSON, one line or event for streams).
    scan: Scanner,
    lines: Lines,
    /// A gap cut the body: its JSON scan is not trusted.
    scan_lost: bool,
}

impl Exchange {
    fn new(route: Option<&'static str>, started: u64) -> Self {
        Exchange {
            route,
            started,
            model: None,
            status: 0,
            body: BodyKind::Other,
            first_byte: None,
            fields: [None; RESPONSE_FIELDS.len()],
            events: 0,
            scan: Scanner::new(RESPONSE_FIELDS),
            lines: Lines::default(),
            scan_lost: false,
        }
    }

    fn body(&mut self, bytes: &[u8]) {
        let fields = &mut self.fields;
        let mut found = |i: usize, v: Value| {
            if let Some(n) = v.as_u64() {
                fields[i] = Some(n);
            }
        };
        match self.body {
            BodyKind::Json | BodyKind::Other if !self.scan_lost => {
                self.scan.feed(bytes, &mut found);
            }
            BodyKind::EventStream | BodyKind::Ndjson => {
                let ndjson = self.body == BodyKind::Ndjson;
                for &b in bytes {
                    match self.lines.byte(b, ndjson) {
                        LineByte::Payload => self.scan.feed(&[b], &mut found),
                        LineByte::EventEnd { carried } => {
                            self.scan.finish(&mut found);
                            self.scan.reset();
                            self.events += u64::from(carried);
                        }
                        LineByte::Skip => {}
                    }
                }
            }
            _ => {}
        }
    }

    fn gap(&mut self) {
        match self.body {
            // A line protocol resynchronises at the next line.
            BodyKind::EventStream | BodyKind::Ndjson => {
                self.lines.cut();
                self.scan.reset();
            }
            _ => self.scan_lost = true,
        }
    }

    fn complete(mut self, ended: u64) -> Completed {
        let mut found = |i: usize, v: Value| {
            if let Some(n) = v.as_u64() {
                self.fields[i] = Some(n);
            }
        };
        if !self.scan_lost {
            self.scan.finish(&mut found);
        }
        // A stream's last event need not end with a blank line before the body does.
        if self.lines.pending_event() {
            self.events += 1;
        }
        let first = |range: std::ops::Range<usize>| self.fields[range].iter().find_map(|f| *f);
        let streamed = matches!(self.body, BodyKind::EventStream | BodyKind::Ndjson);
        let output_tokens = match first(OUTPUT) {
            Some(n) => Some((n, TokenSource::Server)),
            None if streamed && self.events > 0 => Some((self.events, TokenSource::Chunks)),
            None => None,
        };
        Completed {
            route: self.route.unwrap_or("other"),
            model: self.model,
            status: self.status,
            streamed,
            duration_ns: ended.saturating_sub(self.started),
            first_byte_ns: self.first_byte.map(|t| t.saturating_sub(self.started)),
            input_tokens: first(INPUT),
            output_tokens,
        }
    }
}

/// Whether a read starts with a request line's method (`POST /…`).
fn starts_request(data: &[u8]) -> bool {
    const METHODS: &[&[u8]] = &[
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
    ];
    METHODS.iter().any(|m| data.starts_with(m))
}

/// Splits an event stream into events (SSE: `data:` lines until a blank line; NDJSON: each
/// line), passing on the payload bytes only.
#[derive(Debug, Default)]
struct Lines {
    /// Bytes of the current line seen (capped).
    col: usize,
    /// The current line is a data line (SSE: after `data:`; NDJSON: always).
    data: bool,
    /// The event so far carried a payload byte.
    carried: bool,
    /// The line was cut by a gap: ignored up to its end.
    cut: bool,
}

enum LineByte {
    Payload,
    EventEnd { carried: bool },
    Skip,
}

impl Lines {
    fn byte(&mut self, b: u8, ndjson: bool) -> LineByte {
        if b == b'\n' {
            let blank = self.col == 0;
            let was_cut = std::mem::take(&mut self.cut);
            self.col = 0;
            self.data = false;
            // NDJSON: every line ends an object; SSE: a blank line ends the event.
            if (ndjson && !blank) || (!ndjson && blank) {
                let carried = std::mem::take(&mut self.carried) && !was_cut;
                return LineByte::EventEnd { carried };
            }
            return LineByte::Skip;
        }
        if b == b'\r' || self.cut {
            return LineByte::Skip;
        }
        const DATA: &[u8] = b"data:";
        let col = self.col;
        self.col = self.col.saturating_add(1);
        if ndjson {
            self.data = true;
        } else if col < DATA.len() {
            if b != DATA[col] {
                self.cut = true;
            }
            self.data = col + 1 == DATA.len();
            return LineByte::Skip;
        }
        if !self.data {
            return LineByte::Skip;
        }
        if !b.is_ascii_whitespace() {
            self.carried = true;
        }
        LineByte::Payload
    }

    fn cut(&mut self) {
        self.cut = true;
        self.carried = false;
    }

    fn pending_event(&self) -> bool {
        self.carried && !self.cut
    }
}

/// Both streams of a connection and the exchanges between them.
#[derive(Debug)]
pub struct Connection {
    requests: Stream,
    responses: Stream,
    exchanges: Exchanges,
    given_up: bool,
    /// Opened before the probes were: bytes are skipped until a read starts a request.
    resync: bool,
}

#[derive(Debug)]
struct Exchanges {
    /// The request being read (its route, start and model so far).
    reading: Option<Exchange>,
    request_scan: Scanner,
    /// Requests read, oldest first; the front one is being answered.
    waiting: VecDeque<Exchange>,
    /// When the first byte of the next request was read (its head may take several reads).
    next_request_at: Option<u64>,
}

impl Default for Connection {
    fn default() -> Self {
        Connection {
            requests: Stream::new(Side::Request),
            responses: Stream::new(Side::Response),
            exchanges: Exchanges {
                reading: None,
                request_scan: Scanner::new(REQUEST_FIELDS),
                waiting: VecDeque::new(),
                next_request_at: None,
            },
            given_up: false,
            resync: false,
        }
    }
}

impl Connection {
    /// A connection found open: the first bytes seen may be the middle of an exchange.
    pub fn resyncing() -> Self {
        Connection {
            resync: true,
            ..Connection::default()
        }
    }

    /// Requests read whose responses have not ended (on inference routes).
    pub fn in_flight(&self) -> usize {
        let waiting = &self.exchanges.waiting;
        waiting.iter().filter(|e| e.route.is_some()).count()
    }

    /// Bytes the server read (`inbound`) or wrote: `data` copied of `len`, at `at` ns.
    pub fn feed(
        &mut self,
        inbound: bool,
        data: &[u8],
        len: u64,
        at: u64,
        out: &mut impl FnMut(Outcome),
    ) {
        if self.given_up {
            return;
        }
        if self.resync {
            if !(inbound && starts_request(data)) {
                return;
            }
            self.resync = false;
        }
        let Connection {
            requests,
            responses,
            exchanges,
            ..
        } = self;
        let trouble = if inbound {
            if requests.between_messages() && !data.is_empty() {
                exchanges.next_request_at.get_or_insert(at);
            }
            requests.feed(data, len, &mut |e| {
                exchanges.on_request(e, at, responses, out);
            });
            requests.trouble()
        } else {
            responses.feed(data, len, &mut |e| exchanges.on_response(e, at, out));
            responses.trouble()
        };
        if let Some(t) = trouble {
            self.given_up = true;
            out(Outcome::GaveUp(t));
        }
    }

    /// The connection closed at `at`: a response that ran until the close is complete.
    pub fn close(&mut self, at: u64, out: &mut impl FnMut(Outcome)) {
        if self.given_up {
            return;
        }
        let exchanges = &mut self.exchanges;
        self.responses
            .close(&mut |e| exchanges.on_response(e, at, out));
    }
}

impl Exchanges {
    fn on_request(
        &mut self,
        e: Event<'_>,
        at: u64,
        responses: &mut Stream,
        out: &mut impl FnMut(Outcome),
    ) {
        match e {
            Event::Request(head) => {
                let route = (head.method == "POST")
                    .then(|| ROUTES.iter().copied().find(|r| *r == head.path))
                    .flatten();
                self.request_scan.reset();
                responses.expect_response(head.method == "HEAD");
                let started = self.next_request_at.take().unwrap_or(at);
                self.reading = Some(Exchange::new(route, started));
            }
            Event::Body(bytes) => {
                if let Some(x) = self.reading.as_mut().filter(|x| x.route.is_some()) {
                    self.request_scan.feed(bytes, &mut |i, v| {
                        if let (0, Value::Str(model)) = (i, v) {
                            x.model = Some(model);
                        }
                    });
                }
            }
            Event::End => {
                if let Some(x) = self.reading.take() {
                    if self.waiting.len() == MAX_IN_FLIGHT {
                        out(Outcome::Overflow);
                    } else {
                        self.waiting.push_back(x);
                    }
                }
            }
            // The rest of the body is not scanned: its JSON framing is lost.
            Event::BodyGap(_) => self.request_scan.stop(),
            Event::Response(_) => {}
        }
    }

    fn on_response(&mut self, e: Event<'_>, at: u64, out: &mut impl FnMut(Outcome)) {
        // A response with no request read (the probes came after it): ignored.
        let Some(x) = self.waiting.front_mut() else {
            return;
        };
        match e {
            Event::Response(head) => {
                x.status = head.status;
                x.body = head.body;
            }
            Event::Body(bytes) => {
                if x.first_byte.is_none() && !bytes.is_empty() {
                    x.first_byte = Some(at);
                }
                if x.route.is_some() {
                    x.body(bytes);
                }
            }
            Event::BodyGap(_) => {
                x.first_byte.get_or_insert(at);
                x.gap();
            }
            Event::End => {
                let x = self.waiting.pop_front().expect("front exists");
                out(match x.route {
                    Some(_) => Outcome::Completed(x.complete(at)),
                    None => Outcome::Other,
                });
            }
            Event::Request(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds (inbound, bytes, uncopied, at) and returns what completed.
    fn run(steps: &[(bool, &[u8], u64, u64)]) -> Vec<Outcome> {
        let mut c = Connection::default();
        let mut out = Vec::new();
        for &(inbound, data, extra, at) in steps {
            c.feed(inbound, data, data.len() as u64 + extra, at, &mut |o| {
                out.push(o);
            });
        }
        c.close(10_000, &mut |o| out.push(o));
        out
    }

    fn completed(o: &Outcome) -> &Completed {
        match o {
            Outcome::Completed(c) => c,
            other => panic!("{other:?}"),
        }
    }

    const CHAT: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 60\r\n\r\n{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";

    #[test]
    fn a_json_response_with_usage() {
        let body = br#"{"choices":[{"message":{"content":"usage: {\"completion_tokens\": 99}"}}],"usage":{"completion_tokens":7,"prompt_tokens":11}}"#;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let out = run(&[
            (true, CHAT, 0, 100),
            (false, head.as_bytes(), 0, 900),
            (false, body, 0, 1_000),
        ]);
        assert_eq!(
            out,
            vec![Outcome::Completed(Completed {
                route: "/v1/chat/completions",
                model: Some("tiny".into()),
                status: 200,
                streamed: false,
                duration_ns: 900,
                first_byte_ns: Some(900),
                input_tokens: Some(11),
                output_tokens: Some((7, TokenSource::Server)),
            })]
        );
    }

    #[test]
    fn an_event_stream_counts_its_events_unless_the_server_says() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        let event = |json: &str| format!("{:x}\r\ndata: {json}\r\n\r\n\r\n", json.len() + 10);
        let (a, b) = (event(r#"{"content":"a"}"#), event(r#"{"content":"b"}"#));
        let done = event("[DONE]");
        let last = event(r#"{"content":"","timings":{"predicted_n":2,"prompt_n":5}}"#);
        let steps = |last: &[u8]| -> Vec<Outcome> {
            run(&[
                (true, CHAT, 0, 0),
                (false, head, 0, 10),
                (false, a.as_bytes(), 0, 20),
                (false, b.as_bytes(), 0, 30),
                (false, last, 0, 40),
                (false, b"0\r\n\r\n", 0, 50),
            ])
        };
        let out = steps(last.as_bytes());
        let c = completed(&out[0]);
        assert_eq!(c.output_tokens, Some((2, TokenSource::Server)));
        assert_eq!(c.input_tokens, Some(5));
        assert_eq!(
            (c.first_byte_ns, c.duration_ns, c.streamed),
            (Some(20), 50, true)
        );
        let out = steps(done.as_bytes());
        assert_eq!(
            completed(&out[0]).output_tokens,
            Some((3, TokenSource::Chunks)),
            "two events and [DONE], counted"
        );
    }

    #[test]
    fn an_ollama_ndjson_stream_gives_exact_counts() {
        let req = b"POST /api/generate HTTP/1.1\r\nContent-Length: 31\r\n\r\n{\"model\":\"llama3\",\"prompt\":\"x\"}";
        let chunk = |line: &str| format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
        let res = [
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
            chunk(r#"{"response":"a","done":false}"#),
            chunk(r#"{"response":"","done":true,"eval_count":3,"prompt_eval_count":4}"#),
            "0\r\n\r\n".to_owned(),
        ]
        .concat();
        let res = res.as_bytes();
        // Split anywhere: the same result.
        for cut in 0..res.len() {
            let out = run(&[
                (true, req, 0, 0),
                (false, &res[..cut], 0, 5),
                (false, &res[cut..], 0, 9),
            ]);
            let c = completed(&out[0]);
            assert_eq!(c.model.as_deref(), Some("llama3"));
            assert_eq!(c.output_tokens, Some((3, TokenSource::Server)), "cut {cut}");
            assert_eq!(c.input_tokens, Some(4));
        }
    }

    #[test]
    fn an_exchange_starts_at_its_requests_first_byte() {
        // The client's small writes arrive 40 ms apart (Nagle waiting for a delayed ACK).
        let (head, body) = CHAT.split_at(20);
        let out = run(&[
            (true, head, 0, 1_000),
            (true, body, 0, 41_000),
            (
                false,
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                0,
                50_000,
            ),
        ]);
        assert_eq!(completed(&out[0]).duration_ns, 49_000);
    }

    #[test]
    fn pipelined_requests_pair_in_order_and_other_routes_only_count() {
        let two = [CHAT, b"GET /health HTTP/1.1\r\n\r\n"].concat();
        let out = run(&[
            (true, &two, 0, 0),
            (false, b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0, 7),
        ]);
        assert_eq!(completed(&out[0]).status, 500);
        assert_eq!(out[1], Outcome::Other);
    }

    #[test]
    fn a_cut_request_body_keeps_the_model_read_before_the_cut() {
        let head = b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100000\r\n\r\n";
        let body = br#"{"model":"m","prompt":"long"#;
        let out = run(&[
            (true, head, 0, 0),
            (true, body, 100_000 - body.len() as u64, 1),
            (
                false,
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                0,
                2,
            ),
        ]);
        assert_eq!(completed(&out[0]).model.as_deref(), Some("m"));
    }

    #[test]
    fn responses_without_requests_and_tls_are_not_measured() {
        let out = run(&[(false, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0, 1)]);
        assert_eq!(out, vec![]);
        let out = run(&[(true, b"\x16\x03\x01", 0, 1), (true, CHAT, 0, 2)]);
        assert_eq!(out, vec![Outcome::GaveUp(Trouble::Tls)]);
    }

    #[test]
    fn too_many_requests_in_flight_are_dropped() {
        let many = CHAT.repeat(MAX_IN_FLIGHT + 1);
        let mut c = Connection::default();
        let mut out = Vec::new();
        c.feed(true, &many, many.len() as u64, 0, &mut |o| out.push(o));
        assert_eq!(out, vec![Outcome::Overflow]);
        assert_eq!(c.in_flight(), MAX_IN_FLIGHT);
    }
}
