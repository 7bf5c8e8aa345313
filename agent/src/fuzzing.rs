//! Entry points for the cargo-fuzz targets in `fuzz/` (`cargo xtask fuzz`): each runs one
//! parser of input that other users control on arbitrary bytes, and checks what the parser
//! promises beyond not panicking — bounded output, sanitised labels, no secret in a label.
//! Built only with the `fuzzing` feature.

use crate::identity::{derive, looks_like_secret, sanitize_label, ProcessFacts, MAX_LABEL_LEN};

/// A label value as every exported one must be: bounded, of the safe alphabet, no credential.
fn assert_label(value: &str) {
    assert!(value.len() <= MAX_LABEL_LEN, "label too long: {value:?}");
    assert!(
        value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:/@+=-".contains(c)),
        "label outside the alphabet: {value:?}"
    );
    assert!(!value.contains(['?', '#']), "URL secrets kept: {value:?}");
}

/// `gpu-info-<pid>.json`, written by any local user.
pub fn gpu_info(data: &[u8]) {
    if let Ok(info) = crate::gpuinfo::schema::parse(data) {
        assert!((0.0..1e18).contains(&info.gpu_memory_allocated_bytes));
        assert!((0.0..1e18).contains(&info.gpu_memory_reserved_bytes));
        assert!(info
            .gpu_utilization
            .is_none_or(|u| (0.0..=100.0).contains(&u)));
        assert!(info.timestamp.is_finite() && info.gpu_index <= 1024);
    }
}

/// `/proc/<pid>/cmdline` and `/proc/<pid>/environ`: whatever the process wrote there.
pub fn proc_cmdline_environ(data: &[u8]) {
    let argv = crate::proc::parse::parse_cmdline(data);
    assert!(argv.len() <= crate::proc::parse::MAX_ARGS);
    let env = crate::proc::parse::parse_environ_selected(data, crate::identity::MODEL_ENV_VARS);
    assert!(env
        .iter()
        .all(|(name, _)| crate::identity::MODEL_ENV_VARS.contains(&name.as_str())));
}

/// `/proc/<pid>/maps`: file names are chosen by whoever maps the file.
pub fn proc_maps(data: &[u8]) {
    let libraries = crate::proc::parse::shared_objects(data);
    assert!(libraries.len() <= 1024);
    for lib in crate::cuda::library::cuda_libraries(data) {
        assert!(crate::cuda::library::library_api(&lib.path).is_some());
    }
}

/// `/proc/<pid>/status` (NSpid), `/proc/<pid>/stat` (a comm may hold `) ` and spaces) and
/// `/proc/stat`.
pub fn proc_status_stat(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::proc::parse::parse_ns_pid(&text);
    let _ = crate::proc::parse::boot_time(&text);
    let _ = crate::proc::parse::stat(data);
}

/// `/proc/<pid>/cgroup`: the container id, if any, is 64 lowercase hex digits.
pub fn proc_cgroup(data: &[u8]) {
    if let Some(c) = crate::identity::container_from_cgroup(&String::from_utf8_lossy(data)) {
        assert!(
            c.id.len() == 64
                && c.id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{:?}",
            c.id
        );
        assert_eq!(c.short_id().len(), 12);
    }
}

/// `/proc/<pid>/net/tcp{,6}`, `fib_trie` and `if_inet6` of any network namespace.
pub fn proc_net(data: &[u8]) {
    let _ = crate::servers::parse_tcp_table(data);
    let text = String::from_utf8_lossy(data);
    let _ = crate::servers::addresses::parse_fib_trie(&text);
    let _ = crate::servers::addresses::parse_if_inet6(&text);
}

/// A file named `libcudart.so*` or `libcuda.so*`: any user can make one.
pub fn elf_symbols(data: &[u8]) {
    for api in [
        agent_common::cuda::API_RUNTIME,
        agent_common::cuda::API_DRIVER,
    ] {
        if let Ok(offsets) = crate::cuda::symbols::resolve(std::io::Cursor::new(data), api) {
            for (id, _) in offsets {
                assert_eq!(agent_common::cuda::FUNCTIONS[id as usize].api, api);
            }
        }
    }
}

/// An OCI bundle's `config.json`, written by whoever created the container.
pub fn oci_config(data: &[u8]) {
    if let Some(names) = crate::identity::oci::parse_annotations(data) {
        let _ = (
            sanitize_label(&names.pod),
            sanitize_label(&names.namespace),
            sanitize_label(&names.container),
        );
    }
}

/// Docker's `/containers/<id>/json` answer: names and labels come from whoever ran it.
pub fn docker_inspect(data: &[u8]) {
    if let Ok(Some(answer)) = crate::http_client::parse(data, true) {
        if let Ok(Some(c)) = crate::identity::docker::parse_inspect(&answer) {
            let _ = (sanitize_label(&c.name), sanitize_label(&c.pod));
        }
    }
}

/// What an inference server (any process listening on a port) answers a probe.
pub fn probe_response(data: &[u8]) {
    use crate::identity::Framework;
    for framework in [Framework::Vllm, Framework::Sglang, Framework::Ollama] {
        let api = crate::servers::api(framework).expect("a server framework");
        for eof in [false, true] {
            let Ok(Some(answer)) = crate::http_client::parse(data, eof) else {
                continue;
            };
            if let crate::servers::Outcome::Answered(crate::servers::Answer::Ollama(models)) =
                crate::servers::probe::classify(&answer, api)
            {
                assert!(models.len() <= crate::servers::ollama::MAX_MODELS);
                for m in &models {
                    assert_label(&m.name);
                }
            }
        }
    }
}

/// The bytes an inference server's clients send it and it answers: any client can send
/// anything. The input is cut into records — a control byte (bit 0: the server wrote it;
/// bit 1: the probe copied less than the call moved; bits 2–3: accept, close, or data),
/// a length byte, then that many bytes — fed to the connections' parsers and the metrics.
pub fn http_exchanges(data: &[u8]) {
    use crate::requests::{
        exchange::Completed, json::MAX_VALUE, Connections, Record, RequestMetrics, MAX_SERIES,
    };
    use agent_common::http::{HTTP_ACCEPT, HTTP_CLOSE, HTTP_IN, HTTP_OUT};
    let mut connections = Connections::default();
    let mut metrics = RequestMetrics::default();
    let mut rest = data;
    let mut at = 0u64;
    while let [control, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        at += 1_000;
        let kind = match control >> 2 & 3 {
            0 => HTTP_ACCEPT,
            1 => HTTP_CLOSE,
            _ if control & 1 == 1 => HTTP_OUT,
            _ => HTTP_IN,
        };
        let gap = if control & 2 == 2 {
            u64::from(*len) * 97
        } else {
            0
        };
        let record = Record {
            kind,
            tgid: u32::from(control >> 4 & 3),
            conn: 3,
            len: n as u64 + gap,
            at_ns: at,
            data: bytes,
        };
        connections.record(record, &mut |pid, c: Completed| {
            assert!(c.model.as_ref().is_none_or(|m| m.len() <= 3 * MAX_VALUE));
            assert!(c.duration_ns <= at && c.first_byte_ns.is_none_or(|f| f <= c.duration_ns));
            metrics.add(pid, &c);
        });
    }
    assert!(metrics.series.len() <= MAX_SERIES);
    for key in metrics.series.keys() {
        assert_label(&key.model);
    }
}

/// Ollama's `/api/ps` body.
pub fn ollama_ps(data: &[u8]) {
    if let Some(models) = crate::servers::ollama::parse_ps(data) {
        assert!(models.len() <= crate::servers::ollama::MAX_MODELS);
        for m in &models {
            assert_label(&m.name);
            assert!(m.expires_at.is_none_or(f64::is_finite));
        }
    }
}

/// The classifier and the label sanitiser on a command line and environment anyone can
/// choose: every label it derives is sanitised and bounded, and none looks like a secret.
pub fn classify(data: &[u8]) {
    let label = sanitize_label(&String::from_utf8_lossy(data));
    assert_label(&label);
    let (cmdline, environ) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let argv = crate::proc::parse::parse_cmdline(cmdline);
    let exe = argv.first().cloned().unwrap_or_default();
    let facts = ProcessFacts {
        pid: 2,
        ppid: 1,
        comm: exe
            .rsplit('/')
            .next()
            .unwrap_or("")
            .chars()
            .take(15)
            .collect(),
        exe,
        env: crate::proc::parse::parse_environ_selected(environ, crate::identity::MODEL_ENV_VARS),
        libraries: argv.iter().skip(1).take(4).cloned().collect(),
        argv,
    };
    if let Some(id) = derive(&facts, None) {
        assert_label(&id.model_name);
        assert_label(&id.llm_type);
        assert!(!looks_like_secret(&id.model_name), "{:?}", id.model_name);
    }
}

/// `--web.config.file`'s YAML.
pub fn web_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::web_config::parse(text, std::path::Path::new("web.yml"));
    }
}

/// `--classify.rules`' YAML, then (after a 0xff byte) a command line it is tried on: a file
/// compiles or is refused with reasons, and whatever a rule derives from any command line is
/// a sanitised, bounded label that does not look like a secret.
pub fn classify_rules(data: &[u8]) {
    let (text, cmdline) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let rules = match crate::identity::Rules::parse(text) {
        Ok(rules) => rules,
        Err(problems) => {
            assert!(!problems.is_empty());
            return;
        }
    };
    let argv = crate::proc::parse::parse_cmdline(cmdline);
    let facts = ProcessFacts {
        pid: 2,
        ppid: 1,
        comm: "fuzz".into(),
        exe: argv.first().cloned().unwrap_or_default(),
        env: vec![("MODEL".into(), argv.last().cloned().unwrap_or_default())],
        libraries: argv.iter().skip(1).take(4).cloned().collect(),
        argv,
    };
    let _ = rules.needs(&facts);
    if let Some((i, crate::identity::Verdict::Classify(id))) = rules.decide(&facts) {
        assert!(rules.name(i).is_some());
        assert_label(&id.model_name);
        assert_label(id.framework.as_str());
        assert!(!looks_like_secret(&id.model_name), "{:?}", id.model_name);
    }
}
