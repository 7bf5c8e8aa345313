use std::time::{Duration, Instant};

use llmscope::gpuinfo::{GpuInfo, Reason, Rejection, Scan};

use super::*;

fn proc(pid: u32, ppid: u32, start: u64, cmdline: &str) -> ProcInfo {
    let argv: Vec<String> = cmdline.split(' ').map(str::to_owned).collect();
    ProcInfo {
        pid,
        ppid,
        name: argv[0].rsplit(['/', '\\']).next().unwrap().to_owned(),
        exe: argv[0].clone(),
        argv,
        start_time: start,
        cpu_seconds: 1.0,
        memory_bytes: 1 << 30,
        threads: Some(4),
    }
}

fn world() -> Vec<ProcInfo> {
    vec![
        proc(1, 0, 100, "C:\\Windows\\System32\\services.exe"),
        proc(40, 1, 200, "C:\\Python311\\python.exe -m vllm.entrypoints.openai.api_server --model Qwen/Qwen2.5-7B-Instruct --api-key sk-secret"),
        proc(41, 40, 201, "C:\\Python311\\python.exe -c from multiprocessing.spawn import spawn_main; spawn_main(parent_pid=40, pipe_handle=7) --multiprocessing-fork"),
        proc(50, 1, 300, "C:\\llama\\llama-server.exe -m C:\\models\\qwen2.5-7b-instruct-q4_k_m.gguf"),
        proc(60, 1, 400, "C:\\Games\\renderer.exe"),
        proc(70, 1, 500, "C:\\Windows\\notepad.exe C:\\models\\vllm.log"),
    ]
}

fn inputs(processes: Vec<ProcInfo>, now: Instant) -> Inputs {
    Inputs {
        processes,
        gpu_info: None,
        smi: None,
        now,
    }
}

fn labels_of(s: &Poll, pid: u32) -> Option<&ProcessLabels> {
    s.processes
        .samples
        .iter()
        .find(|p| p.labels.pid == pid.to_string())
        .map(|p| &p.labels)
}

#[test]
fn classifies_with_the_agents_code_and_expires_after_grace() {
    let mut poller = Poller::new(Duration::from_secs(10), 100);
    let t0 = Instant::now();
    let s = poller.poll(inputs(world(), t0));
    let vllm = labels_of(&s, 40).expect("vLLM server");
    assert_eq!(
        (
            vllm.framework.as_str(),
            vllm.model_name.as_str(),
            vllm.role.as_str()
        ),
        ("vllm", "Qwen/Qwen2.5-7B-Instruct", "server")
    );
    let worker = labels_of(&s, 41).expect("its multiprocessing child");
    assert_eq!(
        (worker.role.as_str(), worker.model_name.as_str()),
        ("worker", "Qwen/Qwen2.5-7B-Instruct")
    );
    let llama = labels_of(&s, 50).expect("llama-server.exe");
    assert_eq!(
        (
            llama.framework.as_str(),
            llama.model_name.as_str(),
            llama.name.as_str()
        ),
        (
            "llama.cpp",
            "qwen2.5-7b-instruct-q4_k_m",
            "llama-server.exe"
        )
    );
    for pid in [1, 60, 70] {
        assert!(
            labels_of(&s, pid).is_none(),
            "pid {pid} is not an LLM process"
        );
    }
    let text = format!("{s:?}");
    assert!(!text.contains("sk-secret"), "no command line in any label");

    // Second poll: CPU percent from the difference; then the server exits.
    let mut later = world();
    later.iter_mut().find(|p| p.pid == 40).unwrap().cpu_seconds = 3.0;
    let s = poller.poll(inputs(later, t0 + Duration::from_secs(2)));
    let p = s
        .processes
        .samples
        .iter()
        .find(|p| p.labels.pid == "40")
        .unwrap();
    assert_eq!(p.cpu_percent, Some(100.0));
    let gone: Vec<ProcInfo> = world().into_iter().filter(|p| p.pid != 40).collect();
    let s = poller.poll(inputs(gone.clone(), t0 + Duration::from_secs(4)));
    let p = s
        .processes
        .samples
        .iter()
        .find(|p| p.labels.pid == "40")
        .expect("kept through the grace period");
    assert!(!p.alive);
    let s = poller.poll(inputs(gone, t0 + Duration::from_secs(15)));
    assert!(labels_of(&s, 40).is_none(), "gone after the grace period");
}

#[test]
fn a_reused_pid_never_inherits_old_series() {
    let mut poller = Poller::new(Duration::from_secs(10), 100);
    let t0 = Instant::now();
    poller.poll(inputs(world(), t0));
    let mut reused = world();
    let p = reused.iter_mut().find(|p| p.pid == 50).unwrap();
    *p = proc(50, 1, 999, "C:\\Windows\\notepad.exe");
    let s = poller.poll(inputs(reused, t0 + Duration::from_secs(1)));
    assert!(labels_of(&s, 50).is_none());
}

#[test]
fn gpu_reports_and_nvidia_smi_join_the_identities() {
    let mut poller = Poller::new(Duration::from_secs(10), 100);
    let report = |pid: u32| GpuInfo {
        version: 1,
        pid,
        start_time_ticks: None,
        gpu_memory_allocated_bytes: 3e9,
        gpu_memory_reserved_bytes: 4e9,
        gpu_utilization: Some(55.0),
        gpu_index: 0,
        timestamp: 0.0,
    };
    let scan = Scan {
        accepted: vec![report(40), report(60)],
        rejected: ["gpu-info-1.json", "gpu-info-2.json"]
            .map(|file| Rejection {
                file: file.into(),
                version: None,
                reason: Reason::Symlink,
            })
            .into(),
        truncated: false,
    };
    let gpus = vec![DeviceSample {
        index: 0,
        uuid: "GPU-1".into(),
        name: "RTX".into(),
        utilization_percent: Some(37.0),
        ..Default::default()
    }];
    let apps = vec![SmiApp {
        pid: 50,
        gpu_uuid: "GPU-1".into(),
        memory_bytes: Some(8e9),
    }];
    let s = poller.poll(Inputs {
        processes: world(),
        gpu_info: Some(Ok(scan)),
        smi: Some(Ok((gpus, apps))),
        now: Instant::now(),
    });
    let g = s.gpu_info.as_ref().unwrap();
    let allocated: Vec<(&str, &str, f64)> = g
        .reports
        .iter()
        .map(|(l, info)| {
            (
                l.pid.as_str(),
                l.framework.as_str(),
                info.gpu_memory_allocated_bytes,
            )
        })
        .collect();
    assert_eq!(
        allocated,
        vec![("40", "vllm", 3e9), ("60", "unknown", 3e9)],
        "a process that reports GPU use is tracked"
    );
    let smi = s.smi.as_ref().unwrap();
    assert_eq!(smi.processes.len(), 1);
    assert_eq!(smi.processes[0].0.framework, "llama.cpp");
    let rejected: Vec<(&str, u64)> = g
        .rejected
        .iter()
        .filter(|c| c.value > 0)
        .map(|c| (c.kind, c.value))
        .collect();
    assert_eq!(rejected, [("symlink", 2)]);
    assert_eq!(g.rejected.len(), Reason::ALL.len(), "every reason from 0");
    assert_eq!(smi.devices[0].utilization_percent, Some(37.0));
    assert_eq!((&g.error, &smi.error), (&None, &None));

    let s = poller.poll(Inputs {
        processes: world(),
        gpu_info: None,
        smi: Some(Err("nvidia-smi: not found".into())),
        now: Instant::now(),
    });
    let smi = s.smi.unwrap();
    assert_eq!(
        smi.error.as_deref(),
        Some("nvidia-smi: not found"),
        "a missing nvidia-smi is a failing collector, not an error"
    );
    assert!(smi.devices.is_empty());
}

#[test]
fn user_rules_apply_at_each_poll_and_new_rules_at_the_next() {
    let rules = |text: &str| {
        Some(std::sync::Arc::new(
            llmscope::identity::Rules::parse(text).unwrap(),
        ))
    };
    let mut poller = Poller::new(Duration::from_secs(10), 100);
    poller.set_rules(rules(
        r#"rules:
  - {name: renderer, match: {name: '^renderer\.exe$'}, framework: acme-render, model_name: scene-v2}
  - {name: no-llama, match: {argv: 'qwen2\.5'}, ignore: true}"#,
    ));
    let t0 = Instant::now();
    let s = poller.poll(inputs(world(), t0));
    let renderer = labels_of(&s, 60).expect("named by the rule");
    assert_eq!(
        (
            renderer.framework.as_str(),
            renderer.model_name.as_str(),
            renderer.role.as_str()
        ),
        ("acme-render", "scene-v2", "server")
    );
    assert!(labels_of(&s, 50).is_none(), "llama-server ignored");
    let counts = s.processes.rules.clone().unwrap();
    assert_eq!(
        counts.matches,
        [("no-llama".to_owned(), 1), ("renderer".to_owned(), 1)]
    );
    let s = poller.poll(inputs(world(), t0 + Duration::from_secs(1)));
    assert_eq!(s.processes.rules.unwrap().matches[0].1, 1, "counted once");

    poller.set_rules(None);
    let s = poller.poll(inputs(world(), t0 + Duration::from_secs(2)));
    assert!(labels_of(&s, 50).is_some(), "built-in rules again");
    assert!(
        labels_of(&s, 60).is_none(),
        "no rule names the renderer any more"
    );
    assert!(s.processes.rules.is_none());
}
