//! `llmscope top` as a person uses it: in a real terminal (tmux, 80×24), against the real
//! agent with the NVML test double, a CUDA workload on the real probes and a vLLM-shaped
//! server with its engine core. Keys are typed with `send-keys`, the screen is read with
//! `capture-pane`. And `--once` read as text. Run as root (`cargo xtask test`).

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// A tmux server of this test's own, with one window running a shell.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(width: u16, height: u16) -> Tmux {
        let tmux = Tmux {
            socket: format!("llmscope-top-{}", std::process::id()),
        };
        tmux.run(&[
            "new-session",
            "-d",
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            "bash --norc --noprofile",
        ]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("running tmux (cargo xtask test installs it)");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `keys` (tmux key names: "Enter", "Escape", "C-c", or text).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "0"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// A line typed into the shell.
    fn type_line(&self, line: &str) {
        self.run(&["send-keys", "-t", "0", "-l", line]);
        self.keys(&["Enter"]);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "0"])
    }

    fn alternate_screen(&self) -> bool {
        self.run(&["display-message", "-p", "-t", "0", "#{alternate_on}"])
            .trim()
            == "1"
    }

    /// Waits until the screen satisfies `ok`; the screen then.
    fn until(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        wait_for(WAIT, || {
            let s = self.screen();
            ok(&s).then_some(s)
        })
        .unwrap_or_else(|| panic!("screen never showed {what}:\n{}", self.screen()))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The agent with the NVML double (one H100, the vLLM engine core using 16 GiB) and exact
/// launch counting, a vLLM-shaped server with its engine core, and a CUDA workload
/// launching 2,000 kernels a second.
struct Node {
    agent: Agent,
    vllm: Proc,
    engine_core: u32,
    launcher: CudaWorkload,
    _work: TempDir,
}

fn node() -> Node {
    let work = TempDir::new("llmscope-top-test");
    let (vllm, engine_core) = start_vllm("meta-llama/Llama-3.1-8B-Instruct", "spawn");
    let values = fake_h100_values(&work.0, engine_core);
    let lib = fake_nvml_library();
    let agent = Agent::start_with_env(
        &[
            "--nvml-lib",
            lib.to_str().unwrap(),
            "--nvml-interval",
            "500ms",
            "--cuda-overhead-budget",
            "100",
            "--grace-period",
            "2s",
        ],
        &[("LLMSCOPE_FAKE_NVML", values.to_str().unwrap())],
    );
    let cudart = fake_cuda_library("runtime");
    let mut launcher = CudaWorkload::start(
        &cuda_workload("llama-server"),
        &["-m", "/models/qwen2.5-7b-instruct-q4_k_m.gguf"],
        &[
            ("CUDA_LIB", cudart.to_str().unwrap()),
            ("LAUNCH_RATE", "2000"),
            ("SECONDS", "120"),
        ],
    );
    agent.wait_cuda_libraries(1.0);
    launcher.go();
    Node {
        agent,
        vllm,
        engine_core,
        launcher,
        _work: work,
    }
}

fn top_command(agent: &Agent, extra: &str) -> String {
    format!(
        "{} top --url http://{} --interval 500ms {extra}; echo TOP-EXITED-$?",
        env!("CARGO_BIN_EXE_llmscope"),
        agent.addr
    )
}

/// The screen line of `pid`'s row.
fn row(screen: &str, pid: u32) -> Option<String> {
    screen
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&pid.to_string()))
        .map(str::to_owned)
}

/// The value in `column` of a row: right-aligned, it ends where its title ends.
fn column(screen: &str, pid: u32, title: &str) -> Option<String> {
    let header = screen
        .lines()
        .find(|l| l.trim_start().starts_with("PID "))?;
    let end = header.find(title)? + title.len();
    let line = row(screen, pid)?;
    let prefix: String = line.chars().take(end).collect();
    prefix.split_whitespace().last().map(str::to_owned)
}

#[test]
fn top_in_a_terminal_shows_the_node_sorts_filters_follows_processes_and_restores_the_terminal() {
    let node = node();
    let tmux = Tmux::start(80, 24);
    tmux.type_line(&top_command(&node.agent, ""));
    let launcher = node.launcher.pid();
    let screen = tmux.until("the processes with their GPU and CUDA work", |s| {
        row(s, node.engine_core).is_some_and(|r| r.contains("16.0G"))
            && column(s, launcher, "LNCH/s").is_some_and(|v| v != "-")
    });
    assert!(tmux.alternate_screen());
    for want in [
        "llmscope top  sort cpu  3 processes  http://",
        "GPU 0 NVIDIA H100 80GB HBM3  util 63%  mem 20.0G/80.0G  66°C  412W",
        "q quit  s sort  r reverse  / filter",
    ] {
        assert!(
            screen.contains(want),
            "{want:?} not on the screen:\n{screen}"
        );
    }
    // The engine core sits under its server; the launcher counts about 2,000 a second.
    let engine = row(&screen, node.engine_core).unwrap();
    assert!(engine.contains("└ "), "{engine}");
    let lines: Vec<&str> = screen.lines().collect();
    let at = |pid: u32| {
        lines
            .iter()
            .position(|l| l.split_whitespace().next() == Some(&pid.to_string()))
    };
    assert_eq!(
        at(node.engine_core).unwrap(),
        at(node.vllm.pid()).unwrap() + 1,
        "{screen}"
    );
    let rate = column(&screen, launcher, "LNCH/s").unwrap();
    let launches: f64 = rate.trim().trim_end_matches('k').parse().unwrap();
    let launches = if rate.ends_with('k') {
        launches * 1000.0
    } else {
        launches
    };
    assert!(
        (1000.0..3000.0).contains(&launches),
        "{rate} launches/s:\n{screen}"
    );
    for l in screen.lines() {
        assert!(l.chars().count() <= 80, "{l:?}");
    }

    // Sort: `s` goes to memory, then gpu; in pid order the server comes first.
    tmux.keys(&["s"]);
    tmux.until("sort memory", |s| s.contains("sort memory"));
    tmux.keys(&["s", "s", "s", "s"]);
    let screen = tmux.until("sort pid", |s| s.contains("sort pid"));
    let roots: Vec<u32> = screen
        .lines()
        .filter(|l| !l.contains('└'))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let mut sorted = roots.clone();
    sorted.sort_unstable();
    assert_eq!(roots, sorted, "{screen}");
    tmux.keys(&["r"]);
    tmux.until("reversed", |s| s.contains("sort pid ↑"));

    // Filter: only the launcher (and nothing else) is left; Escape brings everything back.
    tmux.keys(&["/"]);
    tmux.until("the filter prompt", |s| s.contains("filter: _"));
    tmux.run(&["send-keys", "-t", "0", "-l", "qwen2.5"]);
    tmux.keys(&["Enter"]);
    let screen = tmux.until("only the launcher", |s| {
        s.contains("filter \"qwen2.5\"") && row(s, node.engine_core).is_none()
    });
    assert!(row(&screen, launcher).is_some(), "{screen}");
    tmux.keys(&["Escape"]);
    tmux.until("everything again", |s| row(s, node.engine_core).is_some());

    // A process appears, exits, and goes after the grace period.
    let mut late = spawn(&workload("llama-cli"), &["-m", "/models/late.gguf"]);
    let pid = late.pid();
    tmux.until("the new process", |s| row(s, pid).is_some());
    late.kill();
    tmux.until("the exited process gone", |s| row(s, pid).is_none());

    // A wider window shows every column; the table follows the resize.
    tmux.run(&["resize-window", "-t", "0", "-x", "160", "-y", "30"]);
    let screen = tmux.until("every column", |s| {
        s.contains("SYNC%") && s.contains("POD/CONTAINER")
    });
    assert!(
        column(&screen, node.engine_core, "CUDAMEM").is_some(),
        "{screen}"
    );

    // `q` quits and the shell gets its terminal back: main screen, cooked mode.
    tmux.keys(&["q"]);
    tmux.until("the shell again", |s| s.contains("TOP-EXITED-0"));
    assert!(!tmux.alternate_screen());
    tmux.type_line("stty -a | grep -o -- '-*icanon'");
    let screen = tmux.until("stty's answer", |s| {
        s.lines().any(|l| l.trim().ends_with("icanon"))
    });
    assert!(
        screen.lines().any(|l| l.trim() == "icanon"),
        "the terminal is left in raw mode:\n{screen}"
    );

    // Ctrl-C quits cleanly too.
    tmux.run(&["send-keys", "-t", "0", "clear", "Enter"]);
    tmux.type_line(&top_command(&node.agent, ""));
    tmux.until("top again", |s| s.contains("q quit"));
    tmux.keys(&["C-c"]);
    tmux.until("the shell again", |s| s.contains("TOP-EXITED-0"));
    assert!(!tmux.alternate_screen());
}

#[test]
fn top_once_prints_a_plain_table_with_rates() {
    let node = node();
    let out = Command::new(env!("CARGO_BIN_EXE_llmscope"))
        .args(["top", "--once", "--interval", "1s", "--sort", "pid"])
        .args(["--url", &format!("http://{}", node.agent.addr)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "GPU 0 NVIDIA H100 80GB HBM3  util 63%  mem 20.0G/80.0G  66°C  412W"
    );
    assert_eq!(lines[1], "");
    assert!(
        lines[2].split_whitespace().eq([
            "PID",
            "PROCESS",
            "FRAMEWORK",
            "ROLE",
            "MODEL",
            "POD/CONTAINER",
            "CPU%",
            "RSS",
            "GPUMEM",
            "CUDAMEM",
            "LNCH/s",
            "COPY/s",
            "SYNC%",
            "OOM",
            "REQ/s",
            "LAT"
        ]),
        "{}",
        lines[2]
    );
    let engine = row(&text, node.engine_core).expect("the engine core");
    assert!(
        engine.contains("meta-llama/Llama-3.1-8B-Instruct"),
        "{engine}"
    );
    assert!(engine.contains("16.0G"), "{engine}");
    let launcher = row(&text, node.launcher.pid()).expect("the launcher");
    let fields: Vec<&str> = launcher.split_whitespace().collect();
    assert_eq!(
        &fields[1..5],
        [
            "llama-server",
            "llama.cpp",
            "server",
            "qwen2.5-7b-instruct-q4_k_m"
        ]
    );
    assert_ne!(fields[10], "-", "launches counted: {launcher}");

    // An agent that is not there: a clear error, exit code 1.
    let out = Command::new(env!("CARGO_BIN_EXE_llmscope"))
        .args([
            "top",
            "--once",
            "--url",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: http://127.0.0.1:") && err.contains("refused"),
        "{err}"
    );
}

/// An agent behind `--web.config.file` (TLS and basic auth): `top` given the same file trusts
/// the certificate it names and speaks https; the password comes from the environment.
#[test]
fn top_speaks_the_agents_tls_and_basic_auth() {
    let tmp = TempDir::new("llmscope-top-tls");
    let dir = &tmp.0;
    self_signed_certificate(dir, "tls");
    let (other, _) = self_signed_certificate(dir, "other");
    let hash = bcrypt::hash("watch-secret", 6).unwrap();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!("tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\nbasic_auth_users:\n  operator: '{hash}'\n"),
    )
    .unwrap();
    let agent = Agent::spawn(&["--web.config.file", web.to_str().unwrap()], &[]);
    let top_with = |password: Option<&str>, extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmscope"));
        cmd.args(extra);
        cmd.args(["--once", "--interval", "200ms", "--user", "operator"])
            .args(["--web.config.file", web.to_str().unwrap()])
            // The agent's own listen address, as its environment would give it.
            .env("LLMSCOPE_WEB_LISTEN_ADDRESS", agent.addr.to_string())
            .env_remove("LLMSCOPE_TOP_PASSWORD");
        if let Some(p) = password {
            cmd.env("LLMSCOPE_TOP_PASSWORD", p);
        }
        cmd.output().unwrap()
    };
    let top = |password: Option<&str>| top_with(password, &["top"]);
    let ok = wait_for(WAIT, || {
        let out = top(Some("watch-secret"));
        out.status.success().then_some(out)
    })
    .unwrap_or_else(|| {
        panic!(
            "top never read the TLS agent: {:?}\n{}",
            top(Some("watch-secret")),
            agent.log()
        )
    });
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(text.contains("GPU  none seen by NVML"), "{text}");
    assert!(text.contains("PID PROCESS"), "{text}");

    let wrong = top(Some("guess"));
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("401: the agent wants credentials"), "{err}");
    // Another certificate than the agent's: refused.
    let impostor = top_with(
        Some("watch-secret"),
        &["top", "--tls.ca-file", other.to_str().unwrap()],
    );
    assert_eq!(impostor.status.code(), Some(1));
    let err = String::from_utf8_lossy(&impostor.stderr);
    assert!(err.contains("invalid peer certificate"), "{err}");
    let none = top(None);
    assert!(
        String::from_utf8_lossy(&none.stderr)
            .contains("--user needs a password: LLMSCOPE_TOP_PASSWORD or --password-file"),
        "{none:?}"
    );
}
