//! `cargo xtask bench requests`: what request telemetry costs, measured in one run.
//!
//! Each round has two phases in alternating order, each on a fresh llama-server (tiny model,
//! short completions; a server's rate drifts over its lifetime, so phases never share one):
//! without the agent, and with it following the server (`--requests all`).
//! 1. The server: CLIENTS clients on kept-alive connections send REQUESTS completions each;
//!    requests per second over the phase. Goal: median ratio with / without ≥ 0.99.
//! 2. Everyone else: then, with the server idle, a loopback TCP ping-pong (64 bytes each way)
//!    in this process, which is no server and takes no probe: the median of BLOCKS blocks of
//!    ns per round trip. Goal: median ratio with / without ≤ 1.01.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const ROUNDS: usize = 7;
const CLIENTS: usize = 2;
const REQUESTS: usize = 150;
const BLOCKS: usize = 7;
const ROUND_TRIPS: u32 = 5_000;

/// A fresh llama-server on a free port, answering.
fn llama_server() -> (Proc, u16) {
    let var = |name: &str| {
        std::env::var_os(name)
            .unwrap_or_else(|| panic!("{name} is not set: run `cargo xtask bench requests`"))
    };
    let port = free_port();
    let server = Proc(
        Command::new(var("LLMSCOPE_LLAMA_SERVER"))
            .arg("-m")
            .arg(var("LLMSCOPE_LLAMA_MODEL"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", "1024", "-np", "2", "-t", "1", "--no-webui"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting llama-server"),
    );
    let up = wait_for(Duration::from_secs(60), || {
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        http_get(addr, "/health", None)
            .ok()
            .filter(|(code, _, _)| *code == 200)
    });
    assert!(up.is_some(), "llama-server did not come up");
    (server, port)
}

/// One completion on a kept-alive connection; false when the server had closed it
/// (cpp-httplib closes one after 100 requests).
fn complete(stream: &mut TcpStream) -> bool {
    let body = r#"{"prompt": "Hello", "n_predict": 4}"#;
    let sent = write!(
        stream,
        "POST /completion HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if sent.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            assert!(
                buf.is_empty(),
                "llama-server closed the connection mid-response"
            );
            return false;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|l| l.trim().parse().ok())
            .expect("a Content-Length");
        if buf.len() >= end + 4 + length {
            return true;
        }
    }
}

/// Requests per second of CLIENTS clients sending REQUESTS completions each.
fn requests_per_second(port: u16) -> f64 {
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                let connect = || {
                    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    s
                };
                let mut stream = connect();
                let mut done = 0;
                while done < REQUESTS {
                    if complete(&mut stream) {
                        done += 1;
                    } else {
                        stream = connect();
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    (CLIENTS * REQUESTS) as f64 / started.elapsed().as_secs_f64()
}

/// The median ns per loopback round trip of 64 bytes, in this process (no probe).
fn ping_pong() -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut buf = [7u8; 64];
    let mut blocks: Vec<f64> = (0..BLOCKS)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..ROUND_TRIPS {
                s.write_all(&buf).unwrap();
                s.read_exact(&mut buf).unwrap();
            }
            started.elapsed().as_nanos() as f64 / f64::from(ROUND_TRIPS)
        })
        .collect();
    drop(s);
    echo.join().unwrap();
    blocks.sort_by(f64::total_cmp);
    blocks[BLOCKS / 2]
}

/// One phase on a fresh server: (requests/s, ping-pong ns, requests the agent measured).
fn phase(with_agent: bool) -> (f64, f64, Option<f64>) {
    let agent = with_agent.then(|| Agent::start(&["--rescan-interval", "1h", "--requests", "all"]));
    let (server, port) = llama_server();
    if let Some(agent) = &agent {
        let probed = wait_for(Duration::from_secs(30), || {
            (agent.metrics().value("llmscope_http_probed_processes", &[]) == Some(1.0))
                .then_some(())
        });
        assert!(
            probed.is_some(),
            "llama-server not probed:\n{}",
            agent.log()
        );
    }
    // The connection the server's blocked accept returns is not followed (docs/design.md).
    assert!(complete(
        &mut TcpStream::connect(("127.0.0.1", port)).unwrap()
    ));
    let rate = requests_per_second(port);
    std::thread::sleep(Duration::from_millis(500));
    let pong = ping_pong();
    let measured = agent.as_ref().map(|agent| {
        let pid = server.pid().to_string();
        agent
            .metrics()
            .find(
                "gen_ai_server_request_duration_seconds_count",
                &[("pid", &pid)],
            )
            .iter()
            .map(|(_, v)| v)
            .sum()
    });
    (rate, pong, measured)
}

fn main() {
    require_root();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "request telemetry: a fresh llama-server per phase (tiny model, n_predict 4), {CLIENTS} kept-alive clients × {REQUESTS} completions; then a loopback ping-pong in the bench process, median of {BLOCKS} × {ROUND_TRIPS} round trips; {ROUNDS} rounds, phases alternating\n"
    );
    println!("| round | requests/s without | with | ratio | ping-pong ns without | with | ratio | requests measured |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let (mut served, mut others) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let (without, with) = if round % 2 == 1 {
            let a = phase(false);
            (a, phase(true))
        } else {
            let b = phase(true);
            (phase(false), b)
        };
        served.push(with.0 / without.0);
        others.push(with.1 / without.1);
        println!(
            "| {round} | {:.1} | {:.1} | {:.4} | {:.0} | {:.0} | {:.4} | {:.0} of {} |",
            without.0,
            with.0,
            with.0 / without.0,
            without.1,
            with.1,
            with.1 / without.1,
            with.2.unwrap_or(f64::NAN),
            CLIENTS * REQUESTS + 1,
        );
    }
    println!(
        "llama-server requests/s with / without request telemetry: {} (goal: median ≥ 0.99)",
        ratio_summary(&served)
    );
    println!(
        "another process's send/recv round trip with / without: {} (goal: median ≤ 1.01)",
        ratio_summary(&others)
    );
}
