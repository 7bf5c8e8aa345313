use super::*;
use crate::api::{Agent, Gpu, ProcessCuda, ProcessGpu, ProcessRequests};

fn process(pid: u32, ppid: u32, name: &str, framework: &str, model: &str, cpu: f64) -> Process {
    Process {
        pid,
        ppid,
        name: name.into(),
        framework: framework.into(),
        model_name: model.into(),
        role: "server".into(),
        alive: true,
        cpu_percent: Some(cpu),
        memory_bytes: 2 << 30,
        start_time_seconds: 1000.0 + f64::from(pid),
        ..Process::default()
    }
}

/// A vLLM server with two workers, a llama-server, and a script: at `t` seconds of work.
fn node(t: f64) -> Node {
    let mut vllm = process(
        100,
        1,
        "vllm",
        "vllm",
        "meta-llama/Llama-3.1-8B-Instruct",
        5.0,
    );
    vllm.requests = Some(ProcessRequests {
        requests: (10.0 * t) as u64,
        duration_seconds_sum: 10.0 * t * 0.25,
        ..Default::default()
    });
    vllm.pod = "vllm-0".into();
    vllm.namespace = "llm".into();
    let mut w1 = process(
        101,
        100,
        "VLLM::EngineCor",
        "vllm",
        "meta-llama/Llama-3.1-8B-Instruct",
        90.0,
    );
    w1.role = "worker".into();
    w1.gpu = Some(ProcessGpu {
        memory_bytes: Some(17179869184.0),
        sm_utilization_percent: Some(58.0),
    });
    w1.cuda = Some(ProcessCuda {
        device_memory_bytes: 16 << 30,
        kernel_launches: 2000.0 * t,
        memcpy_bytes: 1e6 * t,
        sync_seconds: 0.1 * t,
        ooms: 0,
        ..Default::default()
    });
    let mut w2 = process(
        102,
        100,
        "VLLM::Worker",
        "vllm",
        "meta-llama/Llama-3.1-8B-Instruct",
        1.0,
    );
    w2.role = "worker".into();
    let llama = process(
        200,
        1,
        "llama-server",
        "llama.cpp",
        "qwen2.5-7b-instruct-q4_k_m",
        40.0,
    );
    let mut gone = process(300, 1, "python3", "transformers", "gpt2", 0.0);
    gone.alive = false;
    Node {
        api_version: 1,
        agent: Agent {
            version: "0.1.0".into(),
            mode: "ebpf".into(),
        },
        gpus: vec![Gpu {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            utilization_percent: Some(63.0),
            memory_used_bytes: Some(21474836480.0),
            memory_total_bytes: Some(85899345920.0),
            temperature_celsius: Some(66.0),
            power_watts: Some(412.0),
            ..Gpu::default()
        }],
        processes: vec![llama, w2, gone, vllm, w1],
    }
}

fn options(sort: SortKey, filter: &str) -> Options {
    Options {
        sort,
        reverse: false,
        filter: filter.into(),
    }
}

fn order(rows: &[Row]) -> Vec<(usize, u32)> {
    rows.iter().map(|r| (r.depth, r.process.pid)).collect()
}

#[test]
fn workers_sit_under_their_server_and_groups_sort_by_their_total() {
    let (before, now) = (node(10.0), node(12.0));
    let rows = rows(&now, Some((&before, 2.0)), &options(SortKey::Cpu, ""));
    // vLLM's group (96 % in all) before llama-server (40 %); its busiest worker first.
    assert_eq!(
        order(&rows),
        [(0, 100), (1, 101), (1, 102), (0, 200), (0, 300)]
    );
    let w1 = &rows[1].rates;
    assert_eq!(w1.launches, Some(2000.0));
    assert_eq!(w1.copy_bytes, Some(1e6));
    assert!((w1.sync_percent.unwrap() - 10.0).abs() < 1e-9);
    let server = &rows[0].rates;
    assert_eq!(server.requests, Some(10.0));
    assert_eq!(server.latency, Some(0.25));

    let by_pid = rows_of(&now, SortKey::Pid, false);
    assert_eq!(by_pid, [100, 101, 102, 200, 300]);
    let reversed = rows_of(&now, SortKey::Pid, true);
    assert_eq!(reversed, [300, 200, 100, 102, 101]);
    assert_eq!(rows_of(&now, SortKey::Gpu, false)[..2], [100, 101]);
}

fn rows_of(now: &Node, sort: SortKey, reverse: bool) -> Vec<u32> {
    let o = Options {
        sort,
        reverse,
        filter: String::new(),
    };
    rows(now, None, &o).iter().map(|r| r.process.pid).collect()
}

#[test]
fn a_filter_keeps_matching_rows_with_their_server() {
    let now = node(1.0);
    let rows = rows(&now, None, &options(SortKey::Cpu, "enginecor"));
    assert_eq!(order(&rows), [(0, 100), (1, 101)]);
    let rows = super::rows(&now, None, &options(SortKey::Cpu, "LLM"));
    assert_eq!(
        order(&rows).len(),
        3,
        "the namespace matches the server's group"
    );
    assert!(super::rows(&now, None, &options(SortKey::Cpu, "nothing")).is_empty());
}

#[test]
fn a_process_new_since_the_last_reading_has_no_rates_yet() {
    let before = node(1.0);
    let mut now = node(2.0);
    now.processes
        .push(process(400, 1, "llama-cli", "llama.cpp", "m", 1.0));
    // A reused pid (another start) is a new process too.
    now.processes[4].start_time_seconds += 1.0;
    let rows = rows(&now, Some((&before, 1.0)), &options(SortKey::Pid, ""));
    let new = rows.iter().find(|r| r.process.pid == 400).unwrap();
    assert_eq!(new.rates, Rates::default());
    let reused = rows.iter().find(|r| r.process.pid == 101).unwrap();
    assert_eq!(reused.rates.launches, None);
}

#[test]
fn eighty_columns_keep_the_essentials_and_every_line_fits() {
    let (before, now) = (node(1.0), node(2.0));
    let rows = rows(&now, Some((&before, 1.0)), &options(SortKey::Cpu, ""));
    let (header, lines) = table(&rows, Some(80));
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "PID",
            "PROCESS",
            "FRAMEWORK",
            "MODEL",
            "CPU%",
            "RSS",
            "GPUMEM",
            "LNCH/s",
            "REQ/s"
        ]
    );
    for l in lines.iter().chain([&header]) {
        assert!(l.chars().count() <= 80, "{l:?}");
    }
    assert!(lines[0].contains(" Llama-3.1-8… "), "{}", lines[0]);
    assert!(lines[1].contains("└ VLLM::Engi…"), "{}", lines[1]);
    assert!(lines[1].contains("16.0G"), "{}", lines[1]);
    assert!(lines[1].contains("2.0k"), "{}", lines[1]);
    let (wide, _) = table(&rows, None);
    for title in [
        "ROLE",
        "POD/CONTAINER",
        "CUDAMEM",
        "COPY/s",
        "SYNC%",
        "OOM",
        "LAT",
    ] {
        assert!(wide.contains(title), "{wide}");
    }
}

#[test]
fn the_plain_table_has_the_gpus_and_every_column() {
    let (before, now) = (node(1.0), node(2.0));
    let text = plain(&now, Some((&before, 1.0)), &options(SortKey::Cpu, ""));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "GPU 0 NVIDIA H100 80GB HBM3  util 63%  mem 20.0G/80.0G  66°C  412W"
    );
    assert_eq!(lines[1], "");
    assert!(lines[2].starts_with("    PID PROCESS"), "{}", lines[2]);
    let server = lines[3];
    assert!(
        server.contains("meta-llama/Llama-3.1-8B-Instruct"),
        "{server}"
    );
    assert!(server.contains("llm/vllm-0"), "{server}");
    assert!(server.contains("250ms"), "{server}");
    assert_eq!(lines.len(), 3 + 5);
}

#[test]
fn units() {
    assert_eq!(bytes(512.0), "512B");
    assert_eq!(bytes(1536.0), "1.5K");
    assert_eq!(bytes(17179869184.0), "16.0G");
    assert_eq!(bytes(200.0 * 1024.0 * 1024.0), "200M");
    assert_eq!(count(0.5), "0.5");
    assert_eq!(count(950.0), "950");
    assert_eq!(count(12345.0), "12.3k");
    assert_eq!(count(4.1e6), "4.1M");
    assert_eq!(cell("abcdef", 4, false), "abc…");
    assert_eq!(cell("ab", 4, true), "  ab");
}
