use super::*;

#[test]
fn cmdline_with_non_utf8_quotes_and_empty_arguments() {
    let raw = b"python3\0-c\0print(\"x\")\0\xff\xfe\0\0--model\0it's\0";
    assert_eq!(
        parse_cmdline(raw),
        vec![
            "python3",
            "-c",
            "print(\"x\")",
            "\u{fffd}\u{fffd}",
            "",
            "--model",
            "it's"
        ]
    );
    assert!(parse_cmdline(b"").is_empty());
    assert_eq!(
        parse_cmdline(b"no-nul-terminator"),
        vec!["no-nul-terminator"]
    );
}

#[test]
fn cmdline_argument_count_is_bounded() {
    let raw = "a\0".repeat(MAX_ARGS_FOR_TEST * 2);
    assert_eq!(parse_cmdline(raw.as_bytes()).len(), MAX_ARGS_FOR_TEST);
}
const MAX_ARGS_FOR_TEST: usize = parse::MAX_ARGS;

#[test]
fn environ_keeps_only_wanted_names() {
    let raw = b"HF_TOKEN=hf_secret\0MODEL_NAME=Qwen/Qwen2.5-7B\0PATH=/bin\0BROKEN\0MODEL_ID=\xff\0";
    assert_eq!(
        parse_environ_selected(raw, MODEL_ENV_VARS),
        vec![
            ("MODEL_NAME".to_owned(), "Qwen/Qwen2.5-7B".to_owned()),
            ("MODEL_ID".to_owned(), "\u{fffd}".to_owned())
        ]
    );
}

#[test]
fn shared_objects_from_maps() {
    let maps = b"55d0c0a00000-55d0c0a28000 r--p 00000000 08:01 1 /usr/bin/python3.11\n\
7f00-7f01 r-xp 00000000 08:01 2                          /venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so\n\
7f01-7f02 r--p 00001000 08:01 2                          /venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so\n\
7f02-7f03 r--p 00000000 08:01 3                          /usr/lib/x86_64-linux-gnu/libc.so.6\n\
7f03-7f04 rw-p 00000000 00:00 0                          [heap]\n\
7f04-7f05 rw-p 00000000 00:00 0 \n\
7f05-7f06 r--p 00000000 00:05 9                          /tmp/libcudart.so.12 (deleted)\n";
    assert_eq!(
        shared_objects(maps),
        vec![
            "/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/tmp/libcudart.so.12 (deleted)",
        ]
    );
}

/// A fixture tree shaped like /proc: the reader follows `--path.procfs`.
#[test]
fn reads_through_a_configurable_root() {
    let dir = std::env::temp_dir().join(format!("llmscope-proc-{}", std::process::id()));
    let pid_dir = dir.join("4242");
    std::fs::create_dir_all(&pid_dir).unwrap();
    std::fs::write(dir.join("stat"), "cpu 1 2 3\nbtime 1700000000\n").unwrap();
    std::fs::write(
        pid_dir.join("stat"),
        "4242 (llama-server) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 12345 1000000 2048 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n",
    )
    .unwrap();
    let mut cmdline = b"llama-server\0-m\0/models/x.gguf\0".to_vec();
    cmdline.extend(std::iter::repeat_n(b'a', CMDLINE_LIMIT * 4));
    std::fs::write(pid_dir.join("cmdline"), &cmdline).unwrap();
    std::fs::write(pid_dir.join("comm"), "llama-server\n").unwrap();
    std::fs::write(pid_dir.join("environ"), b"API_KEY=sk-x\0MODEL=qwen\0").unwrap();

    let root = ProcRoot::new(&dir).unwrap();
    assert_eq!(root.boot_time_seconds, 1_700_000_000);
    assert_eq!(root.pids().unwrap(), vec![4242]);
    let sample = root.sample(4242).unwrap();
    assert_eq!(
        (
            sample.ppid,
            sample.cpu_ticks,
            sample.threads,
            sample.start_ticks
        ),
        (1, 300, 7, 12345)
    );
    assert_eq!(sample.rss_bytes, 2048 * procfs::page_size());
    let (facts, _) = root.facts(4242).unwrap();
    assert_eq!(facts.comm, "llama-server");
    assert_eq!(&facts.argv[..3], ["llama-server", "-m", "/models/x.gguf"]);
    let total: usize = facts.argv.iter().map(|a| a.len() + 1).sum();
    assert!(
        total <= CMDLINE_LIMIT + 1,
        "the command line read is bounded"
    );
    assert_eq!(
        root.model_env(4242, &[]).unwrap(),
        vec![("MODEL".to_owned(), "qwen".to_owned())]
    );
    assert!(matches!(root.sample(4243), Err(ProcError::Gone(4243))));
    assert!(matches!(root.facts(4243), Err(ProcError::Gone(4243))));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn innermost_pid_from_nspid() {
    let host = "Name:\tllama-server\nPid:\t4242\nNSpid:\t4242\n";
    let container = "Name:\tpython3\nTgid:\t9000\nNSpid:\t9000\t1\nPPid:\t8990\n";
    let nested = "NSpid:\t9000\t57\t3\n";
    assert_eq!(parse_ns_pid(host), Some(4242));
    assert_eq!(parse_ns_pid(container), Some(1));
    assert_eq!(parse_ns_pid(nested), Some(3));
    assert_eq!(parse_ns_pid("Name:\tx\n"), None);
    assert_eq!(parse_ns_pid("NSpid:\t\n"), None);
}

/// What the `proc_status_stat` fuzz target found: procfs panics on a line with a multi-byte
/// character right after the last `)` (the kernel never writes one: refused before procfs).
#[test]
fn stat_lines_not_of_the_kernels_shape_are_refused_not_a_panic() {
    let crash = b"29117 (cat)\xe0\xad\xdf\xd19100 29100 2377 0 -1 4194331795001104 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 6 140731795004136 14073142976 94097632522240 140731795004116 140731795004175 140731795004136 140731795005419 0\n";
    assert!(parse::stat(crash).is_none());
    // The second: nothing but whitespace after the last `) ` (procfs trims it away first).
    let trailing = b"1234 (evil) R (x) \t\x001 1234 1234 0 \xd3\xce\xdf\xd439450 0 0 0 5 37\xff\xff\xff\xff\xff\xff\xffC\xffpuz_allo\x01\x00\x00@\x00\x00\x00\x00674vil) R (x) \t";
    assert!(parse::stat(trailing).is_none());
    for bad in [
        &b""[..],
        b"(x) S 1",
        b"12 x) S 1",
        b"12 (x)S 1",
        b")( 12",
        b"12 (x) ",
    ] {
        assert!(parse::stat(bad).is_none(), "{bad:?}");
    }
    // A comm with `)`, spaces and invalid UTF-8, as prctl(PR_SET_NAME) allows.
    let own = std::fs::read("/proc/self/stat").unwrap();
    let rest = &own[own.iter().rposition(|&b| b == b')').unwrap() + 1..];
    let mut hostile = b"4242 (a) b\xff) ".to_vec();
    hostile.extend_from_slice(&rest[1..]);
    let stat = parse::stat(&hostile).expect("a kernel-shaped line");
    assert_eq!(stat.pid, 4242);
    assert_eq!(parse::stat(&own).unwrap().pid, std::process::id() as i32);
}
