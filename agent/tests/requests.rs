//! Request telemetry against real servers: the real llama.cpp server (whose own metrics are
//! the truth to check against) and an Ollama-shaped stand-in that streams NDJSON as Ollama
//! does. Each test sends real requests, times them as a client, and compares.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// One exchange as the client saw it.
#[derive(Debug)]
struct Seen {
    status: u16,
    body: String,
    /// From the request's first byte written to the first body byte read.
    first_byte: Duration,
    /// … to the last body byte read.
    duration: Duration,
}

/// Sends `body` to `path` on `stream` (HTTP/1.1, kept alive) and reads the whole response,
/// framed by Content-Length or chunked transfer coding.
fn exchange(stream: &mut TcpStream, path: &str, body: &str) -> Seen {
    try_exchange(stream, path, body).expect("reading the response")
}

/// [`exchange`], failing when the response does not come within the stream's read timeout.
fn try_exchange(stream: &mut TcpStream, path: &str, body: &str) -> std::io::Result<Seen> {
    let started = Instant::now();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut first_byte = None;
    loop {
        quick_ack(stream);
        let n = stream.read(&mut chunk)?;
        assert!(
            n > 0,
            "{path}: closed after {:?} with {:?}",
            started.elapsed(),
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
            continue;
        };
        if buf.len() > head_end {
            first_byte.get_or_insert_with(|| started.elapsed());
        }
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let body = &buf[head_end..];
        let done = if let Some(len) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
            body.len() >= len.trim().parse::<usize>().unwrap()
        } else {
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            body.ends_with(b"0\r\n\r\n")
        };
        if done {
            let status = head[9..12].parse().unwrap();
            return Ok(Seen {
                status,
                body: String::from_utf8_lossy(body).into_owned(),
                first_byte: first_byte.unwrap(),
                duration: started.elapsed(),
            });
        }
    }
}

/// Acknowledges what arrives at once (the kernel turns this off again by itself). A delayed
/// acknowledgement holds the server's next small write back (Nagle's algorithm; neither
/// cpp-httplib nor Python's http.server sets TCP_NODELAY) for up to 40 ms on the network,
/// after the write returned: a wait no probe of the server's calls can see, and not the
/// server's time.
fn quick_ack(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads the int it is given.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// The sum of `name`'s samples that carry `want`.
fn sum(m: &Exposition, name: &str, want: &[(&str, &str)]) -> f64 {
    m.find(name, want).iter().map(|(_, v)| v).sum()
}

/// Waits until the agent follows `pid`'s connections.
fn wait_probed(agent: &Agent, pid: u32) {
    let probed = wait_for(Duration::from_secs(30), || {
        let m = agent.metrics();
        (m.value("llmscope_http_probed_processes", &[]) == Some(1.0)).then_some(())
    });
    assert!(probed.is_some(), "pid {pid} not probed:\n{}", agent.log());
}

#[test]
fn llama_server_requests_and_tokens_match_its_own_metrics() {
    let binary = std::env::var_os("LLMSCOPE_LLAMA_SERVER")
        .expect("LLMSCOPE_LLAMA_SERVER is not set: run the tests with `cargo xtask test`");
    let model = std::env::var_os("LLMSCOPE_LLAMA_MODEL").expect("LLMSCOPE_LLAMA_MODEL");
    let agent = Agent::start(&[
        "--rescan-interval",
        "1h",
        "--requests",
        "all",
        "--log-level",
        "info,llmscope::agent::requests=debug",
    ]);
    let port = free_port();
    let server = Proc(
        Command::new(binary)
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", "512", "-t", "1", "--no-webui", "--metrics"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting llama-server"),
    );
    let own_metrics = || {
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        http_get(addr, "/metrics", None)
            .ok()
            .filter(|(code, _, _)| *code == 200)
            .map(|(_, _, body)| Exposition(body))
    };
    assert!(
        wait_for(Duration::from_secs(60), own_metrics).is_some(),
        "llama-server does not serve /metrics"
    );
    wait_probed(&agent, server.pid());
    // The accept llama-server was blocked in when the probes attached has no return probe:
    // the connection it returns is followed only from the next discovery pass on. This
    // request takes it.
    let before = own_metrics().unwrap();
    let predicted_before = before
        .value("llamacpp:tokens_predicted_total", &[])
        .unwrap_or(0.0);

    // Streamed and not, on both APIs; some kept alive on one connection, some each on its own.
    let native = |stream: bool, n: u32| {
        format!(r#"{{"prompt": "Once upon a time", "n_predict": {n}, "stream": {stream}}}"#)
    };
    let chat = |stream: bool, n: u32| {
        format!(
            r#"{{"model": "tiny-llama", "messages": [{{"role": "user", "content": "Say something"}}], "max_tokens": {n}, "stream": {stream}}}"#
        )
    };
    // Back to back on one kept-alive connection (cpp-httplib closes one idle for 5 s), then
    // each on its own connection.
    let (completion, chat_path) = ("/completion", "/v1/chat/completions");
    let mut kept = connect(port);
    let mut seen = Vec::new();
    for n in [4u32, 7, 12] {
        seen.push((
            completion,
            false,
            exchange(&mut kept, completion, &native(false, n)),
        ));
        seen.push((
            chat_path,
            false,
            exchange(&mut kept, chat_path, &chat(false, n)),
        ));
    }
    seen.push((
        chat_path,
        true,
        exchange(&mut kept, chat_path, &chat(true, 5)),
    ));
    drop(kept);
    for n in [4u32, 7, 12] {
        seen.push((
            completion,
            true,
            exchange(&mut connect(port), completion, &native(true, n)),
        ));
    }
    for n in [6u32, 9] {
        seen.push((
            chat_path,
            true,
            exchange(&mut connect(port), chat_path, &chat(true, n)),
        ));
    }
    for (path, _, s) in &seen {
        assert_eq!(s.status, 200, "{path}: {}", s.body);
    }

    let predicted = own_metrics()
        .unwrap()
        .value("llamacpp:tokens_predicted_total", &[])
        .unwrap()
        - predicted_before;
    let pid = server.pid().to_string();
    let ours = wait_for(Duration::from_secs(10), || {
        let m = agent.metrics();
        let count = sum(
            &m,
            "gen_ai_server_request_duration_seconds_count",
            &[("pid", &pid)],
        );
        // Our last GET /metrics is another exchange, not inference.
        let other = m
            .value("llmscope_http_other_exchanges_total", &[])
            .unwrap_or(0.0);
        (count == seen.len() as f64 && other >= 1.0).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "requests counted {} of {}:\n{}",
            sum(
                &agent.metrics(),
                "gen_ai_server_request_duration_seconds_count",
                &[("pid", &pid)]
            ),
            seen.len(),
            agent.log()
        )
    });
    for route in ["/completion", "/v1/chat/completions"] {
        let n = sum(
            &ours,
            "gen_ai_server_request_duration_seconds_count",
            &[("pid", &pid), ("route", route), ("status_class", "2xx")],
        );
        assert_eq!(n, 6.0, "{route}");
    }
    // Exact: every response said its token counts (usage, timings); none were estimated.
    let output = |source| {
        sum(
            &ours,
            "gen_ai_server_tokens_total",
            &[("pid", &pid), ("token_type", "output"), ("source", source)],
        )
    };
    assert_eq!(
        output("server"),
        predicted,
        "output tokens vs llamacpp:tokens_predicted_total"
    );
    assert_eq!(output("chunks"), 0.0);
    assert!(
        sum(
            &ours,
            "gen_ai_server_tokens_total",
            &[("pid", &pid), ("token_type", "input")]
        ) > 0.0
    );
    // The model a request named labels it; the native API names none (the process's).
    assert_eq!(
        sum(
            &ours,
            "gen_ai_server_request_duration_seconds_count",
            &[
                ("pid", &pid),
                ("model_name", "tiny-llama"),
                ("route", "/v1/chat/completions")
            ],
        ),
        6.0
    );

    // Durations and times to first token within 10 % of the client's, summed.
    let client = |f: fn(&Seen) -> Duration, streamed: Option<bool>| -> f64 {
        seen.iter()
            .filter(|(_, s, _)| streamed.is_none_or(|w| w == *s))
            .map(|(_, _, x)| f(x).as_secs_f64())
            .sum()
    };
    let duration = sum(
        &ours,
        "gen_ai_server_request_duration_seconds_sum",
        &[("pid", &pid)],
    );
    let client_duration = client(|s| s.duration, None);
    let ttft = sum(
        &ours,
        "gen_ai_server_time_to_first_token_seconds_sum",
        &[("pid", &pid)],
    );
    let ttft_count = sum(
        &ours,
        "gen_ai_server_time_to_first_token_seconds_count",
        &[("pid", &pid)],
    );
    let client_ttft = client(|s| s.first_byte, Some(true));
    eprintln!("duration: ours {duration:.4} s, client {client_duration:.4} s; TTFT: ours {ttft:.4} s, client {client_ttft:.4} s");
    assert_eq!(ttft_count, 6.0, "one per streamed request");
    assert!(
        (duration / client_duration - 1.0).abs() < 0.10,
        "{duration} vs {client_duration}"
    );
    assert!(
        (ttft / client_ttft - 1.0).abs() < 0.10,
        "{ttft} vs {client_ttft}"
    );
    assert!(
        sum(
            &ours,
            "gen_ai_server_time_per_output_token_seconds_count",
            &[("pid", &pid)]
        ) > 0.0
    );
    assert_eq!(
        ours.value("gen_ai_server_active_requests", &[("pid", &pid)]),
        Some(0.0)
    );
    // Nothing of a prompt or a completion in the exposition or the log.
    let text = format!("{}{}", ours.0, agent.log());
    for secret in ["Once upon a time", "Say something"] {
        assert!(!text.contains(secret), "{secret:?} leaked");
    }
}

#[test]
fn an_ollama_stream_gives_exact_counts_and_hostile_clients_are_only_counted() {
    // --requests auto: Ollama has no metrics endpoint of its own, so it is followed.
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let port = free_port();
    let server = Proc(
        Command::new(demo::root().join("agent/tests/fixtures/ollama/ollama"))
            .arg("serve")
            .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
            .env("OLLAMA_TEST_MODELS", "llama3.2:1b:100:100")
            .spawn()
            .expect("starting the Ollama stand-in"),
    );
    wait_probed(&agent, server.pid());
    let generate = |stream: bool, n: u32| {
        format!(
            r#"{{"model": "llama3.2:1b", "prompt": "why is the sky blue", "stream": {stream}, "options": {{"num_predict": {n}}}}}"#
        )
    };
    let mut kept = connect(port);
    let a = exchange(&mut kept, "/api/generate", &generate(true, 6));
    let b = exchange(&mut kept, "/api/generate", &generate(false, 3));
    let c = exchange(
        &mut connect(port),
        "/api/chat",
        r#"{"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 4}}"#,
    );
    assert!(
        [&a, &b, &c].iter().all(|s| s.status == 200),
        "{a:?} {b:?} {c:?}"
    );
    // A TLS client and one that sends garbage: counted, nothing else.
    connect(port)
        .write_all(b"\x16\x03\x01\x00\x05hello")
        .unwrap();
    connect(port)
        .write_all(b"\x00\x01\x02 not http\r\n\r\n")
        .unwrap();
    let pid = server.pid().to_string();
    let m = wait_for(Duration::from_secs(10), || {
        let m = agent.metrics();
        let n = sum(
            &m,
            "gen_ai_server_request_duration_seconds_count",
            &[("pid", &pid)],
        );
        let given_up = |reason| {
            m.value(
                "llmscope_http_connections_given_up_total",
                &[("reason", reason)],
            )
            .unwrap_or(0.0)
        };
        (n == 3.0 && given_up("tls") == 1.0 && given_up("malformed") == 1.0).then_some(m)
    })
    .unwrap_or_else(|| panic!("{}\n{}", agent.metrics().0, agent.log()));
    let tokens = |model: &str, token_type: &str| {
        sum(
            &m,
            "gen_ai_server_tokens_total",
            &[
                ("pid", &pid),
                ("model_name", model),
                ("token_type", token_type),
                ("source", "server"),
            ],
        )
    };
    assert_eq!(tokens("llama3.2:1b", "output"), 9.0, "eval_count 6 + 3");
    assert_eq!(tokens("qwen2.5:7b", "output"), 4.0);
    assert!(tokens("llama3.2:1b", "input") > 0.0);
    // The two streams' first tokens: the stand-in sleeps 20 ms before each token, so the
    // server-side times are at least 2 × 20 ms; and each lies inside the client's (from its
    // request's first byte written to the first body byte read). Bounds, not a ratio to the
    // client's figure: on two loaded cores the client's own scheduling adds milliseconds to
    // a 20 ms interval (a 10 % ratio failed at 0.0415 s vs 0.0462 s).
    let ttft = sum(
        &m,
        "gen_ai_server_time_to_first_token_seconds_sum",
        &[("pid", &pid)],
    );
    let client = (a.first_byte + c.first_byte).as_secs_f64();
    assert!(
        (0.040..=client).contains(&ttft),
        "{ttft} s: at least 2 × 20 ms, at most the client's {client} s"
    );
}

/// Each thread of `pid`: its name, and where it waits in the kernel.
fn kernel_stacks(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("{pid}: gone");
    };
    let mut out = String::new();
    for task in tasks.flatten() {
        let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
        let stack: Vec<String> = read("stack").lines().take(6).map(str::to_owned).collect();
        out.push_str(&format!(
            "{} {}: {}\n",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            stack.join(" < ")
        ));
    }
    out
}

/// Go servers (Ollama) make their own system calls: the kernel hooks follow them, the libc
/// probes cannot. Where the agent has the kernel hooks (the VM kernels of `cargo xtask
/// vmtest`) their requests are counted exactly; where it has only the libc probes (this
/// host: no BPF trampolines, no kprobes) the server is not given probes that would see
/// nothing, and that is counted.
#[test]
fn a_go_server_is_followed_by_the_kernel_hooks_and_refused_by_the_libc_probes() {
    let agent = Agent::start(&["--rescan-interval", "1h"]);
    let port = free_port();
    let server = Proc(
        Command::new(go_shaped_server())
            .arg("serve")
            .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
            .spawn()
            .expect("starting the Go-shaped server"),
    );
    let pid = server.pid().to_string();
    let hook = wait_for(Duration::from_secs(30), || {
        let m = agent.metrics();
        let (labels, _) = m
            .samples("llmscope_http_hook")
            .into_iter()
            .find(|(_, v)| *v == 1.0)?;
        let hook = labels.get("hook")?.clone();
        let refused =
            m.value("llmscope_http_probe_failures_total", &[("reason", "go")]) == Some(1.0);
        let followed = m
            .value("gen_ai_server_active_requests", &[("pid", &pid)])
            .is_some();
        (refused || followed).then_some(hook)
    })
    .unwrap_or_else(|| panic!("{}\n{}", agent.metrics().0, agent.log()));
    if hook == "libc" {
        let m = agent.metrics();
        assert_eq!(m.value("llmscope_http_probed_processes", &[]), Some(0.0));
        return;
    }
    assert!(matches!(hook.as_str(), "fentry" | "kprobe"), "{hook}");
    let body = r#"{"model": "llama3.2:1b", "prompt": "why is the sky blue"}"#;
    let ask = |stream: &mut TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        try_exchange(stream, "/api/generate", body).unwrap_or_else(|e| {
            let m = agent.metrics();
            let request_lines: Vec<&str> =
                m.0.lines()
                    .filter(|l| l.starts_with("gen_ai_") || l.starts_with("llmscope_http_"))
                    .collect();
            let sockets = Command::new("ss").arg("-tnpi").output().map(|o| o.stdout);
            panic!(
                "no answer: {e}\n{}\n{}\nsockets:\n{}\nserver threads:\n{}\nagent threads:\n{}",
                agent.log(),
                request_lines.join("\n"),
                String::from_utf8_lossy(&sockets.unwrap_or_default()),
                kernel_stacks(server.pid()),
                kernel_stacks(agent.pid()),
            )
        })
    };
    let mut kept = connect(port);
    let seen = [ask(&mut kept), ask(&mut kept), ask(&mut connect(port))];
    assert!(seen.iter().all(|s| s.status == 200), "{seen:?}");
    let m = wait_for(Duration::from_secs(30), || {
        let m = agent.metrics();
        let n = sum(
            &m,
            "gen_ai_server_request_duration_seconds_count",
            &[("pid", &pid)],
        );
        (n == 3.0).then_some(m)
    })
    .unwrap_or_else(|| panic!("{}\n{}", agent.metrics().0, agent.log()));
    let tokens = |token_type: &str| {
        sum(
            &m,
            "gen_ai_server_tokens_total",
            &[
                ("pid", &pid),
                ("model_name", "llama3.2:1b"),
                ("token_type", token_type),
                ("source", "server"),
            ],
        )
    };
    assert_eq!(tokens("output"), 9.0, "eval_count 3, three times");
    assert_eq!(tokens("input"), 21.0, "prompt_eval_count 7, three times");
}
