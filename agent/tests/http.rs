//! The HTTP server against hostile clients: idle and byte-at-a-time connections cannot stall
//! scrapes, and the server closes them on its own timeout. Run as root (`cargo xtask test`).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn idle_and_trickling_connections_neither_stall_scrapes_nor_stay_open() {
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let addr = agent.addr;
    let idle: Vec<TcpStream> = (0..150)
        .map(|_| TcpStream::connect(addr).expect("connecting"))
        .collect();
    let mut trickling: Vec<TcpStream> = (0..150)
        .map(|_| TcpStream::connect(addr).expect("connecting"))
        .collect();
    let opened = Instant::now();
    // A byte at a time, never a whole request head, for 3 s; meanwhile scrapes must answer.
    for round in 0..6 {
        for s in &mut trickling {
            let _ = s.write_all(&[b"GET /metrics HTTP/1.1\r\n"[round]]);
        }
        let started = Instant::now();
        let (code, _) = agent
            .get("/metrics")
            .expect("a scrape under 300 hostile connections");
        assert_eq!(code, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a scrape took {:?} with 300 idle or trickling connections open",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Past the header timeout (5 s), the server has closed every one of them.
    std::thread::sleep(Duration::from_secs(7).saturating_sub(opened.elapsed()));
    for (kind, streams) in [("idle", idle), ("trickling", trickling)] {
        for mut s in streams {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                // Closed (hyper may first answer a partial head with 408).
                Ok(n) => {
                    let rest = String::from_utf8_lossy(&buf[..n]);
                    assert!(
                        n == 0 || rest.starts_with("HTTP/1.1 408"),
                        "{kind}: {rest:?}"
                    );
                }
                Err(e) => assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "{kind} connection still open after the header timeout"
                ),
            }
        }
    }
    assert_eq!(agent.get("/healthz").unwrap().0, 200);
}

/// 200 concurrent scrapes while /api/processes is polled every 50 ms: every request succeeds,
/// and the CPU percent of a process burning one core is measured over its own window, not
/// since whichever request came last.
#[test]
fn concurrent_scrapes_and_polling_see_stable_cpu_percent() {
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let burner = Proc(
        std::process::Command::new(workload("llama-server"))
            .args(["-m", "/models/burn.gguf"])
            .env("LLMSCOPE_BURN", "1")
            .spawn()
            .unwrap(),
    );
    let pid = burner.pid().to_string();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(agent.get("/api/processes").unwrap().0, 200);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let concurrent: Vec<_> = (0..200)
            .map(|_| s.spawn(|| agent.get("/metrics")))
            .collect();
        for c in concurrent {
            let (code, _) = c.join().unwrap().expect("a concurrent scrape");
            assert_eq!(code, 200);
        }
        std::thread::sleep(Duration::from_millis(1500));
        for _ in 0..4 {
            let cpu = agent
                .metrics()
                .value("llm_process_cpu_percent", &[("pid", &pid)])
                .expect("cpu percent of the burner");
            assert!((80.0..=120.0).contains(&cpu), "one core reads {cpu}");
            std::thread::sleep(Duration::from_millis(1000));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    drop(burner);
}
