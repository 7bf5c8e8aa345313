//! One bounded HTTP/1.1 GET, for every HTTP answer llmscope reads from others (inference
//! servers' API paths, Docker's Engine API) and for its tests: one deadline for the whole
//! exchange (a server that drips a byte a second is cut off, not waited on), a cap on the
//! bytes read, the head parsed by httparse, the body framed by Content-Length, chunked
//! encoding or the end of the connection (`Connection: close` is sent: nothing stays open).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Headers read at most.
const MAX_HEADERS: usize = 64;

/// What to ask.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The `Host` header.
    pub host: &'a str,
    pub path: &'a str,
    pub accept: &'a str,
    /// An `Authorization` header's value (basic auth), sent as is.
    pub authorization: Option<&'a str>,
}

/// How long the whole exchange may take, and how many bytes of answer are read at most.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub max_bytes: usize,
}

/// An answer: its status, content type and body (chunked encoding undone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Lower-cased.
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// The body is all there; false when reading stopped early (the size cap, or the
    /// caller had enough) or the connection ended before the declared length.
    pub complete: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer's head is larger than {0} bytes")]
    TooLarge(usize),
    #[error("not an HTTP answer: {0}")]
    Malformed(String),
}

/// A connection whose reads and writes can be bounded in time.
pub trait Conn: Read + Write {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()>;
}

impl Conn for TcpStream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl<C: Conn + ?Sized> Conn for &mut C {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        (**self).set_timeouts(timeout)
    }
}

#[cfg(unix)]
impl Conn for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

/// Sends the GET on `conn` and reads until the answer is complete, the connection ends,
/// `enough` says the body so far is enough (checked after each read once the head is in),
/// or `limits.max_bytes` are read (an incomplete answer, not an error).
pub fn get<C: Conn>(
    mut conn: C,
    request: &Request,
    limits: Limits,
    mut enough: impl FnMut(&Response) -> bool,
) -> Result<Response, HttpError> {
    let deadline = Instant::now() + limits.timeout;
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        (!left.is_zero())
            .then_some(left)
            .ok_or(HttpError::Timeout(limits.timeout))
    };
    let timed_out = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HttpError::Timeout(limits.timeout),
        _ => HttpError::Io(e),
    };
    conn.set_timeouts(left()?)?;
    let Request {
        host,
        path,
        accept,
        authorization,
    } = request;
    let authorization = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    conn.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\n{authorization}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .map_err(timed_out)?;
    let mut raw = Vec::with_capacity(16 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        conn.set_timeouts(left()?)?;
        let n = match conn.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(timed_out(e)),
        };
        let room = limits.max_bytes - raw.len();
        raw.extend_from_slice(&chunk[..n.min(room)]);
        let capped = raw.len() >= limits.max_bytes;
        match parse(&raw, n == 0)? {
            Some(r) if r.complete || n == 0 || capped || enough(&r) => return Ok(r),
            None if capped => return Err(HttpError::TooLarge(limits.max_bytes)),
            _ => {}
        }
    }
}

/// Connects to `addr` within `connect_timeout` and runs [`get`] with `enough` never
/// satisfied: the whole answer, up to the limits.
pub fn get_tcp(
    addr: std::net::SocketAddr,
    request: &Request,
    connect_timeout: Duration,
    limits: Limits,
) -> Result<Response, HttpError> {
    let conn = TcpStream::connect_timeout(&addr, connect_timeout)?;
    get(conn, request, limits, |_| false)
}

/// The answer in `raw` as far as it goes; `None` while its head is not complete. `eof`: the
/// connection ended after `raw`.
pub fn parse(raw: &[u8], eof: bool) -> Result<Option<Response>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut headers);
    let body_start = match head.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if eof => {
            return Err(HttpError::Malformed("the answer ended in its head".into()))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let status = head.code.unwrap_or(0);
    let header = |name: &str| {
        head.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let content_type = header("content-type");
    let chunked = header("transfer-encoding").is_some_and(|t| t.ends_with("chunked"));
    let rest = &raw[body_start..];
    let (body, complete) = if matches!(status, 100..=199 | 204 | 304) {
        (Vec::new(), true)
    } else if chunked {
        dechunk(rest)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| HttpError::Malformed(format!("Content-Length {length:?}")))?;
        let body = &rest[..rest.len().min(length)];
        (body.to_vec(), body.len() == length)
    } else {
        (rest.to_vec(), eof)
    };
    Ok(Some(Response {
        status,
        content_type,
        body,
        complete,
    }))
}

/// The data of the chunks in `raw` so far, and whether the last chunk was seen.
fn dechunk(mut raw: &[u8]) -> Result<(Vec<u8>, bool), HttpError> {
    let mut body = Vec::with_capacity(raw.len());
    loop {
        let (start, size) = match httparse::parse_chunk_size(raw) {
            Ok(httparse::Status::Complete(c)) => c,
            Ok(httparse::Status::Partial) => return Ok((body, false)),
            Err(_) => return Err(HttpError::Malformed("a bad chunk size".into())),
        };
        if size == 0 {
            return Ok((body, true));
        }
        let data = &raw[start..];
        let take = data.len().min(usize::try_from(size).unwrap_or(usize::MAX));
        body.extend_from_slice(&data[..take]);
        if take < data.len() {
            // The chunk is whole: skip its CRLF.
            raw = data.get(take + 2..).unwrap_or_default();
        } else {
            return Ok((body, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A connection that answers with fixed bytes, in pieces of `piece` bytes.
    struct Canned {
        answer: Cursor<Vec<u8>>,
        piece: usize,
        sent: Vec<u8>,
    }

    impl Read for Canned {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.piece);
            self.answer.read(&mut buf[..n])
        }
    }

    impl Write for Canned {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Conn for Canned {
        fn set_timeouts(&self, _: Duration) -> io::Result<()> {
            Ok(())
        }
    }

    fn canned(answer: &str, piece: usize) -> Canned {
        Canned {
            answer: Cursor::new(answer.as_bytes().to_vec()),
            piece,
            sent: Vec::new(),
        }
    }

    const REQUEST: Request = Request {
        host: "localhost",
        path: "/metrics",
        accept: "text/plain",
        authorization: None,
    };
    const LIMITS: Limits = Limits {
        timeout: Duration::from_secs(2),
        max_bytes: 1024,
    };

    #[test]
    fn lengths_chunks_and_close_delimited_bodies() {
        for (answer, body, complete) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello, and more",
                "hello",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello",
                "hello",
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\n\r\n",
                "hello, world",
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                "hel",
                false,
            ),
            ("HTTP/1.0 200 OK\r\n\r\nuntil the end", "until the end", true),
            ("HTTP/1.1 204 No Content\r\n\r\n", "", true),
        ] {
            for piece in [1, 7, 4096] {
                let r = get(canned(answer, piece), &REQUEST, LIMITS, |_| false).unwrap();
                assert_eq!(
                    (String::from_utf8_lossy(&r.body).as_ref(), r.complete),
                    (body, complete),
                    "{answer:?} in pieces of {piece}"
                );
            }
        }
    }

    #[test]
    fn the_request_asks_to_close_and_the_head_is_read() {
        let mut conn = canned(
            "HTTP/1.1 501 Not Implemented\r\nContent-Type: Text/Plain; charset=utf-8\r\nContent-Length: 0\r\n\r\n",
            64,
        );
        let r = get(&mut conn, &REQUEST, LIMITS, |_| false).unwrap();
        assert_eq!(r.status, 501);
        assert_eq!(r.content_type.as_deref(), Some("text/plain; charset=utf-8"));
        let sent = String::from_utf8(conn.sent).unwrap();
        assert_eq!(
            sent,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn reading_stops_at_the_cap_or_when_the_caller_has_enough() {
        let big = format!("HTTP/1.1 200 OK\r\n\r\n{}", "x".repeat(5000));
        let r = get(canned(&big, 100), &REQUEST, LIMITS, |_| false).unwrap();
        assert_eq!((r.body.len(), r.complete), (1024 - 19, false));
        let r = get(canned(&big, 100), &REQUEST, LIMITS, |r| r.body.len() >= 200).unwrap();
        assert_eq!((r.body.len(), r.complete), (300 - 19, false));
        let head = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "y".repeat(2000));
        assert!(matches!(
            get(canned(&head, 4096), &REQUEST, LIMITS, |_| false),
            Err(HttpError::TooLarge(1024))
        ));
    }

    #[test]
    fn what_is_not_http_is_an_error() {
        for answer in [
            "",
            "garbage\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        ] {
            assert!(
                matches!(
                    get(canned(answer, 4096), &REQUEST, LIMITS, |_| false),
                    Err(HttpError::Malformed(_))
                ),
                "{answer:?}"
            );
        }
    }

    #[test]
    fn a_server_that_drips_is_cut_off_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for b in b"HTTP/1.1 200 OK\r\n\r\n".iter().cycle().take(40) {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        let limits = Limits {
            timeout: Duration::from_millis(500),
            max_bytes: 1024,
        };
        let r = get_tcp(addr, &REQUEST, Duration::from_secs(1), limits);
        assert!(matches!(r, Err(HttpError::Timeout(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        server.join().unwrap();
    }
}
