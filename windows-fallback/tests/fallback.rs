//! llmscope-fallback end to end, twice: the Linux build, and the Windows build (mingw) run
//! under wine, each with a stand-in LLM server and a gpu-info report; scraped from Linux; both
//! must give the same answers.

#[path = "../../agent/tests/support/common.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

const WAIT: Duration = Duration::from_secs(60);
const MODEL: &str = "qwen2.5-7b-instruct-q4_k_m";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cc(compiler: &str, output: &Path, args: &[&str]) {
    let status = Command::new(compiler)
        .arg("-O2")
        .arg("-o")
        .arg(output)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("running {compiler}: {e} (cargo xtask test installs it)"));
    assert!(status.success(), "{compiler} {args:?}");
}

/// Kills what it holds when dropped (the processes, and the wine server of a prefix).
struct Cleanup {
    children: Vec<Child>,
    wineprefix: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(prefix) = &self.wineprefix {
            let _ = Command::new("wineserver")
                .arg("-k")
                .env("WINEPREFIX", prefix)
                .status();
        }
    }
}

enum Build {
    Linux,
    Wine { exe: PathBuf },
}

/// What a scrape says about the stand-in server: its identity labels per family, and the
/// gpu-info values.
type View = BTreeMap<String, (String, String, String, String, f64)>;

fn run(build: Build) -> View {
    let dir = std::env::temp_dir().join(format!(
        "llmscope-fallback-{}-{}",
        std::process::id(),
        matches!(build, Build::Wine { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let reports = dir.join("gpu-info");
    std::fs::create_dir_all(&reports).unwrap();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mut cleanup = Cleanup {
        children: Vec::new(),
        wineprefix: None,
    };

    let (server, fallback, gpu_info_dir) = match &build {
        Build::Linux => {
            let server = dir.join("llama-server");
            cc(
                "cc",
                &server,
                &[fixtures().join("sleeper.c").to_str().unwrap()],
            );
            let model = format!("/models/{MODEL}.gguf");
            (
                Command::new(&server)
                    .args(["-m", &model])
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap(),
                Command::new(env!("CARGO_BIN_EXE_llmscope-fallback")),
                reports.display().to_string(),
            )
        }
        Build::Wine { exe } => {
            let prefix = std::env::temp_dir().join("llmscope-wineprefix");
            cleanup.wineprefix = Some(prefix.clone());
            // Nothing left from an earlier run, and the prefix created before anything runs in
            // it: two wine processes racing to create it can both fail.
            let _ = Command::new("wineserver")
                .arg("-k")
                .env("WINEPREFIX", &prefix)
                .status();
            let booted = Command::new("wineboot")
                .arg("-i")
                .env("WINEPREFIX", &prefix)
                .env("WINEDEBUG", "-all")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            assert!(
                booted.is_ok_and(|s| s.success()),
                "wineboot failed (cargo xtask test installs wine)"
            );
            std::fs::copy(exe, dir.join("llmscope-fallback.exe")).unwrap();
            let f = fixtures();
            cc(
                "x86_64-w64-mingw32-gcc",
                &dir.join("bcryptprimitives.dll"),
                &[
                    "-shared",
                    f.join("bcryptprimitives.c").to_str().unwrap(),
                    f.join("bcryptprimitives.def").to_str().unwrap(),
                    "-ladvapi32",
                ],
            );
            cc(
                "x86_64-w64-mingw32-gcc",
                &dir.join("llama-server.exe"),
                &[f.join("sleeper.c").to_str().unwrap()],
            );
            let wine = |program: &str| {
                let mut c = Command::new("wine");
                c.arg(dir.join(program))
                    .env("WINEPREFIX", &prefix)
                    .env("WINEDEBUG", "-all")
                    .stderr(Stdio::null());
                c
            };
            let model = format!("C:\\models\\{MODEL}.gguf");
            let server = wine("llama-server.exe")
                .args(["-m", &model])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            // wine maps the Linux root to drive Z:.
            (
                server,
                wine("llmscope-fallback.exe"),
                format!("Z:{}", reports.display().to_string().replace('/', "\\")),
            )
        }
    };
    cleanup.children.push(server);
    let mut fallback = fallback;
    fallback
        .args([
            "--interval",
            "500ms",
            "--grace-period",
            "2s",
            "--no-nvidia-smi",
            "--web.listen-address",
            &address,
            "--gpu-info-dir",
            &gpu_info_dir,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cleanup
        .children
        .push(fallback.spawn().expect("starting llmscope-fallback"));

    let addr = address.parse().unwrap();
    let scrape = || {
        http_get(addr, "/metrics", None)
            .ok()
            .map(|(_, _, body)| Exposition(body))
    };
    // The stand-in, classified: its pid as the fallback sees it (wine has its own pids).
    let pid = wait_for(WAIT, || {
        let m = scrape()?;
        m.find(
            "llm_process_memory_bytes",
            &[("framework", "llama.cpp"), ("model_name", MODEL)],
        )
        .first()
        .map(|(l, _)| l["pid"].clone())
    })
    .expect("the stand-in server was never classified");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let report = format!(
        r#"{{"version": 1, "pid": {pid}, "gpu_memory_allocated_bytes": 3221225472, "gpu_memory_reserved_bytes": 4294967296, "gpu_utilization": 55, "gpu_index": 0, "timestamp": {now}}}"#
    );
    let path = reports.join(format!("gpu-info-{pid}.json"));
    std::fs::write(path.with_extension("tmp"), report).unwrap();
    std::fs::rename(path.with_extension("tmp"), &path).unwrap();
    let m = wait_for(WAIT, || {
        scrape().filter(|m| {
            m.value("llm_process_gpu_memory_reserved_bytes", &[("pid", &pid)])
                .is_some()
        })
    })
    .expect("the gpu-info report never showed");

    let mut view = View::new();
    for family in [
        "llm_process_count",
        "llm_process_memory_bytes",
        "llm_process_cpu_seconds_total",
        "llm_process_start_time_seconds",
        "llm_process_gpu_memory_allocated_bytes",
        "llm_process_gpu_memory_reserved_bytes",
        "llm_process_gpu_utilization",
    ] {
        let found = m.find(family, &[("framework", "llama.cpp")]);
        let (labels, value) = found
            .first()
            .unwrap_or_else(|| panic!("{family} missing:\n{}", m.0));
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        let value = if family.contains("gpu") || family.ends_with("count") {
            *value
        } else {
            0.0
        };
        view.insert(
            family.to_owned(),
            (
                get("framework"),
                get("model_name"),
                get("llm_type"),
                get("role"),
                value,
            ),
        );
    }
    assert_eq!(
        m.value("llmscope_build_info", &[("mode", "polling")]),
        Some(1.0)
    );
    // The JSON API `llmscope top` reads: the same process, the same identity.
    let (code, _, body) = http_get(addr, "/api/v1/processes", None).unwrap();
    assert_eq!(code, 200, "{body}");
    let node: serde_json::Value = serde_json::from_str(&body).unwrap();
    let server = node["processes"]
        .as_array()
        .and_then(|list| list.iter().find(|p| p["pid"].as_u64() == pid.parse().ok()))
        .unwrap_or_else(|| panic!("pid {pid} not in /api/v1/processes: {body}"));
    let text = |k: &str| server[k].as_str().unwrap_or_default().to_owned();
    view.insert(
        "/api/v1/processes".to_owned(),
        (
            text("framework"),
            text("model_name"),
            text("llm_type"),
            text("role"),
            f64::from(node["api_version"].as_u64().unwrap_or(0) as u32),
        ),
    );
    let _ = std::fs::remove_dir_all(&dir);
    view
}

#[test]
fn the_linux_and_windows_builds_agree() {
    let linux = run(Build::Linux);
    for (family, (framework, model, family_type, role, _)) in &linux {
        // llm_process_count carries no role (the original monitor's label set, docs/design.md).
        let want_role = if family == "llm_process_count" {
            ""
        } else {
            "server"
        };
        assert_eq!(
            (
                framework.as_str(),
                model.as_str(),
                family_type.as_str(),
                role.as_str()
            ),
            ("llama.cpp", MODEL, "qwen", want_role),
            "{family}"
        );
    }
    assert_eq!(
        linux["llm_process_gpu_memory_allocated_bytes"].4,
        3221225472.0
    );
    assert_eq!(linux["llm_process_gpu_utilization"].4, 55.0);
    assert_eq!(linux["/api/v1/processes"].4, 1.0, "api_version");

    let exe = std::env::var_os("LLMSCOPE_FALLBACK_EXE")
        .map(PathBuf::from)
        .expect("LLMSCOPE_FALLBACK_EXE is not set: run `cargo xtask test`, which builds the Windows binary");
    let windows = run(Build::Wine { exe });
    assert_eq!(
        windows, linux,
        "the Windows build under wine and the Linux build disagree"
    );
}
