//! Real-world command lines, positives and negatives.

use super::*;

fn facts(cmdline: &str) -> ProcessFacts {
    let argv: Vec<String> = cmdline.split_whitespace().map(str::to_owned).collect();
    ProcessFacts {
        pid: 100,
        ppid: 1,
        comm: argv
            .first()
            .map(|a| entry::basename(a).chars().take(15).collect())
            .unwrap_or_default(),
        exe: argv.first().cloned().unwrap_or_default(),
        argv,
        ..Default::default()
    }
}

/// (framework, model_name, role), or None for "not an LLM process".
type Expected<'a> = Option<(&'a str, &'a str, &'a str)>;

fn mismatch(case: &ProcessFacts, expected: Expected) -> Option<String> {
    let got = classify(case).map(|id| {
        (
            id.framework.as_str().to_owned(),
            id.model_name.clone(),
            id.role.as_str(),
        )
    });
    let got_ref = got.as_ref().map(|(f, m, r)| (f.as_str(), m.as_str(), *r));
    (got_ref != expected).then(|| {
        format!(
            "{:?}: got {got_ref:?}, want {expected:?}",
            case.argv.join(" ")
        )
    })
}

fn check(case: &ProcessFacts, expected: Expected, what: &str) {
    if let Some(m) = mismatch(case, expected) {
        panic!("{what}: {m}");
    }
}

#[test]
fn command_lines() {
    #[rustfmt::skip]
    let table: &[(&str, Expected)] = &[
        // vLLM
        ("vllm serve Qwen/Qwen2.5-7B-Instruct", Some(("vllm", "Qwen/Qwen2.5-7B-Instruct", "server"))),
        ("/usr/bin/python3 /usr/local/bin/vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000 --tensor-parallel-size 2", Some(("vllm", "Qwen/Qwen2.5-7B-Instruct", "server"))),
        ("vllm serve --port 8000 meta-llama/Llama-3.1-8B-Instruct", Some(("vllm", "meta-llama/Llama-3.1-8B-Instruct", "server"))),
        ("python3 -m vllm.entrypoints.openai.api_server --model meta-llama/Llama-3.1-8B-Instruct --api-key sk-secret", Some(("vllm", "meta-llama/Llama-3.1-8B-Instruct", "server"))),
        ("python -m vllm.entrypoints.openai.api_server --model=/models/Mistral-7B-Instruct-v0.3/ --served-model-name mistral", Some(("vllm", "Mistral-7B-Instruct-v0.3", "server"))),
        ("python3 -m vllm.entrypoints.api_server --model facebook/opt-125m", Some(("vllm", "facebook/opt-125m", "server"))),
        ("python3 -m vllm.entrypoints.cli.main serve google/gemma-2-9b-it", Some(("vllm", "google/gemma-2-9b-it", "server"))),
        ("vllm serve /root/.cache/huggingface/hub/models--deepseek-ai--DeepSeek-R1-Distill-Qwen-7B/snapshots/916b56a44061fd5cd7d6a8fb632557ed4f724f60", Some(("vllm", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "server"))),
        ("vllm bench throughput --model facebook/opt-125m", Some(("vllm", "facebook/opt-125m", "script"))),
        ("vllm run-batch -i in.jsonl -o out.jsonl --model microsoft/phi-2", Some(("vllm", "microsoft/phi-2", "script"))),
        ("vllm chat --url http://localhost:8000/v1", None),
        ("vllm --version", None),
        // Windows command lines (windows-fallback classifies with the same code)
        ("C:\\Python311\\python.exe -m vllm.entrypoints.openai.api_server --model Qwen/Qwen2.5-7B-Instruct", Some(("vllm", "Qwen/Qwen2.5-7B-Instruct", "server"))),
        ("C:\\llama\\llama-server.exe -m C:\\models\\qwen2.5-7b-instruct-q4_k_m.gguf", Some(("llama.cpp", "qwen2.5-7b-instruct-q4_k_m", "server"))),
        ("C:\\Users\\me\\AppData\\Local\\Programs\\Ollama\\ollama.exe serve", Some(("ollama", "unknown", "server"))),
        ("C:\\Windows\\notepad.exe C:\\models\\model.gguf", None),
        // SGLang
        ("python3 -m sglang.launch_server --model-path meta-llama/Meta-Llama-3-8B-Instruct --port 30000", Some(("sglang", "meta-llama/Meta-Llama-3-8B-Instruct", "server"))),
        ("python -m sglang.launch_server --model-path Qwen/QwQ-32B --tp 4 --host 0.0.0.0", Some(("sglang", "Qwen/QwQ-32B", "server"))),
        ("python3 -m sglang.bench_one_batch --model-path meta-llama/Llama-3.2-1B", Some(("sglang", "meta-llama/Llama-3.2-1B", "script"))),
        // TGI
        ("text-generation-launcher --model-id tiiuae/falcon-7b-instruct --num-shard 1 --port 80", Some(("tgi", "tiiuae/falcon-7b-instruct", "server"))),
        ("/usr/local/bin/text-generation-router --max-concurrent-requests 128 --port 80 --tokenizer-name bigscience/bloom-560m", Some(("tgi", "bigscience/bloom-560m", "worker"))),
        ("/opt/conda/bin/python3.11 /opt/conda/bin/text-generation-server serve bigscience/bloom-560m --uds-path /tmp/text-generation-server", Some(("tgi", "bigscience/bloom-560m", "worker"))),
        ("text-generation-server download-weights bigscience/bloom-560m", None),
        // llama.cpp
        ("llama-server -m /models/qwen2.5-7b-instruct-q4_k_m.gguf --port 8080 -ngl 99", Some(("llama.cpp", "qwen2.5-7b-instruct-q4_k_m", "server"))),
        ("./build/bin/llama-server --model models/Meta-Llama-3.1-8B-Instruct-Q8_0.gguf -c 8192", Some(("llama.cpp", "Meta-Llama-3.1-8B-Instruct-Q8_0", "server"))),
        ("llama-server -hf ggml-org/gemma-3-1b-it-GGUF", Some(("llama.cpp", "ggml-org/gemma-3-1b-it-GGUF", "server"))),
        ("llama-cli -m ~/models/phi-4-Q4_K_M.gguf -p hello -n 128", Some(("llama.cpp", "phi-4-Q4_K_M", "script"))),
        ("llama-bench -m /data/llama-2-7b.Q4_0.gguf", Some(("llama.cpp", "llama-2-7b.Q4_0", "script"))),
        ("python3 -m llama_cpp.server --model /models/mistral-7b-instruct-v0.2.Q4_K_M.gguf --n_gpu_layers -1", Some(("llama.cpp", "mistral-7b-instruct-v0.2.Q4_K_M", "server"))),
        ("llama-quantize in.gguf out.gguf Q4_K_M", None),
        // Ollama
        ("/usr/local/bin/ollama serve", Some(("ollama", "unknown", "server"))),
        // An executable script named ollama (the tests' stand-in) is what it names.
        ("/usr/bin/python3 /opt/fixtures/ollama serve", Some(("ollama", "unknown", "server"))),
        ("/usr/lib/ollama/ollama runner --model /root/.ollama/models/blobs/sha256-6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa --ctx-size 8192 --port 40417", Some(("ollama", "sha256-6a0746a1ec1a", "worker"))),
        ("/tmp/ollama123/runners/cuda_v12/ollama_llama_server --model /usr/share/ollama/.ollama/models/blobs/sha256-8eeb52dfb3bb --port 36245", Some(("ollama", "sha256-8eeb52dfb3bb", "worker"))),
        ("ollama run llama3.2", None),
        ("ollama pull qwen2.5:7b", None),
        ("ollama list", None),
        // transformers / pytorch / scripts
        ("transformers serve --port 8000", Some(("transformers", "unknown", "server"))),
        ("transformers chat Qwen/Qwen2.5-0.5B-Instruct", Some(("transformers", "Qwen/Qwen2.5-0.5B-Instruct", "script"))),
        ("torchrun --nproc_per_node 8 train.py --model_name_or_path meta-llama/Llama-2-7b-hf", Some(("pytorch", "meta-llama/Llama-2-7b-hf", "script"))),
        ("python -m torch.distributed.run --nproc_per_node=2 generate.py --model gpt2", Some(("pytorch", "gpt2", "script"))),
        ("torchserve --start --model-store model_store --models bert=bert.mar", Some(("pytorch", "unknown", "server"))),
        // TensorRT-LLM
        ("trtllm-serve TinyLlama/TinyLlama-1.1B-Chat-v1.0 --port 8000", Some(("tensorrt-llm", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "server"))),
        ("trtllm-serve serve /engines/llama3-8b --tokenizer /models/llama3", Some(("tensorrt-llm", "llama3-8b", "server"))),
        ("trtllm-build --checkpoint_dir ./ckpt --output_dir ./engine", Some(("tensorrt-llm", "unknown", "script"))),
        ("python3 -m tensorrt_llm.commands.serve --model /engines/qwen", Some(("tensorrt-llm", "qwen", "server"))),
        // Triton, TensorFlow, ONNX Runtime
        ("tritonserver --model-repository=/models --http-port 8000", Some(("triton", "unknown", "server"))),
        ("/opt/tritonserver/backends/python/triton_python_backend_stub /models/preprocess/1/model.py", Some(("triton", "unknown", "worker"))),
        ("tensorflow_model_server --rest_api_port=8501 --model_name=half_plus_two --model_base_path=/models/half_plus_two", Some(("tensorflow", "half_plus_two", "server"))),
        ("onnxruntime_perf_test -e cuda /models/resnet50/model.onnx", Some(("onnxruntime", "resnet50", "script"))),
        ("python -m onnxruntime.transformers.benchmark -m bert-base-cased", Some(("onnxruntime", "bert-base-cased", "script"))),
        // LMDeploy, MLC, ExLlamaV2, KoboldCpp, LocalAI
        ("lmdeploy serve api_server internlm/internlm2_5-7b-chat --server-port 23333", Some(("lmdeploy", "internlm/internlm2_5-7b-chat", "server"))),
        ("lmdeploy chat internlm/internlm2_5-7b-chat", Some(("lmdeploy", "internlm/internlm2_5-7b-chat", "script"))),
        ("lmdeploy check_env", None),
        ("mlc_llm serve HF://mlc-ai/Llama-3-8B-Instruct-q4f16_1-MLC", Some(("mlc-llm", "mlc-ai/Llama-3-8B-Instruct-q4f16_1-MLC", "server"))),
        ("python -m mlc_llm chat HF://mlc-ai/gemma-2b-it-q4f16_1-MLC", Some(("mlc-llm", "mlc-ai/gemma-2b-it-q4f16_1-MLC", "script"))),
        ("python /opt/exllamav2/test_inference.py -m /models/Llama2-13B-exl2 -p hello", Some(("exllamav2", "Llama2-13B-exl2", "script"))),
        ("./koboldcpp-linux-x64-cuda1210 --model /models/mythomax-l2-13b.Q5_K_M.gguf --usecublas", Some(("koboldcpp", "mythomax-l2-13b.Q5_K_M", "server"))),
        ("python3 koboldcpp.py /models/tiefighter.gguf 5001", Some(("koboldcpp", "tiefighter", "server"))),
        ("local-ai run --models-path /models", Some(("localai", "unknown", "server"))),
        // Secrets and hostile values never become labels
        ("vllm serve sk-proj-abcdefghijklmnopqrstuvwxyz012345", Some(("vllm", "unknown", "server"))),
        ("llama-server -m /models/weird\"name';rm$(x).gguf", Some(("llama.cpp", "weird_name_rm_x", "server"))),
        ("vllm serve https://user:hunter2@models.example.com/llama-3-8b", Some(("vllm", "llama-3-8b", "server"))),
        ("vllm serve https://user:hunter2@models.example.com", Some(("vllm", "models.example.com", "server"))),
        // Negatives: a command line that merely mentions a framework
        ("pip install vllm", None),
        ("python3 -m pip install vllm==0.6.3", None),
        ("grep llama log.txt", None),
        ("vim model.gguf", None),
        ("tail -f vllm.log", None),
        ("git clone https://github.com/ggml-org/llama.cpp", None),
        ("cat /models/qwen2.5-7b-instruct-q4_k_m.gguf", None),
        ("less /var/log/ollama.log", None),
        ("docker run vllm/vllm-openai --model meta-llama/Llama-3.1-8B", None),
        ("kubectl logs deploy/vllm", None),
        ("huggingface-cli download meta-llama/Llama-3.1-8B-Instruct", None),
        ("cmake -B build -DGGML_CUDA=ON", None),
        ("bash -c vllm serve x", None),
        ("python3", None),
        ("python3 manage.py runserver", None),
        ("python3 -c print(1)", None),
        ("make -j8 llama-server", None),
        ("rsync -a /models/llama/ backup:/models/", None),
        ("code /home/me/src/vllm", None),
        ("sleep 30", None),
    ];
    assert!(table.len() >= 60, "at least 60 real command lines");
    let failures: Vec<String> = table
        .iter()
        .filter_map(|(cmdline, expected)| mismatch(&facts(cmdline), *expected))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
}

#[test]
fn model_from_environment_when_the_command_line_says_nothing() {
    let mut f = facts("text-generation-launcher --port 8080");
    f.env = vec![
        (
            "HF_TOKEN".into(),
            "hf_abcdefghijklmnopqrstuvwxyzABCDEF".into(),
        ),
        ("MODEL_ID".into(), "HuggingFaceH4/zephyr-7b-beta".into()),
    ];
    check(
        &f,
        Some(("tgi", "HuggingFaceH4/zephyr-7b-beta", "server")),
        "env MODEL_ID",
    );
    f.env = vec![(
        "MODEL_NAME".into(),
        "hf_abcdefghijklmnopqrstuvwxyzABCDEF".into(),
    )];
    check(
        &f,
        Some(("tgi", "unknown", "server")),
        "a secret in MODEL_NAME is dropped",
    );
}

#[test]
fn python_scripts_are_classified_by_the_libraries_they_load() {
    let cases: &[(&[&str], Option<&str>)] = &[
        (
            &["/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so"],
            Some("pytorch"),
        ),
        (
            &[
                "/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
                "/venv/lib/python3.11/site-packages/tokenizers/tokenizers.abi3.so",
            ],
            Some("transformers"),
        ),
        (
            &[
                "/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
                "/venv/lib/python3.11/site-packages/vllm/_C.abi3.so",
            ],
            Some("vllm"),
        ),
        (
            &["/venv/lib/python3.11/site-packages/llama_cpp/lib/libllama.so"],
            Some("llama.cpp"),
        ),
        (&["/usr/lib/x86_64-linux-gnu/libssl.so.3"], None),
    ];
    for (libs, expected) in cases {
        let mut f = facts("python3 chat.py --model Qwen/Qwen2.5-0.5B-Instruct");
        f.libraries = libs.iter().map(|s| (*s).to_owned()).collect();
        let got = classify(&f);
        assert_eq!(
            got.as_ref().map(|i| i.framework.as_str()),
            *expected,
            "{libs:?}"
        );
        if let Some(id) = got {
            assert_eq!(
                (id.model_name.as_str(), id.role),
                ("Qwen/Qwen2.5-0.5B-Instruct", Role::Script)
            );
        }
    }
    for (libs, expected) in cases {
        for lib in libs.iter().filter(|_| expected.is_some()) {
            let name = lib.rsplit('/').next().unwrap();
            assert!(
                FRAMEWORK_LIBRARY_PREFIXES
                    .iter()
                    .any(|p| name.starts_with(p)),
                "the kernel must report mappings of {name}"
            );
        }
    }
    let mut pip = facts("python3 -m pip install torch");
    pip.libraries = vec!["/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so".into()];
    assert_eq!(classify(&pip), None, "pip is never an LLM process");
    assert!(!worth_rechecking(&pip), "pip is not worth re-examining");
    assert!(worth_rechecking(&facts("python3 chat.py")));
    assert!(!worth_rechecking(&facts(
        "/usr/bin/python3 /usr/local/bin/pytest -x"
    )));
    assert!(
        !worth_rechecking(&facts(
            "python3 -m vllm.entrypoints.openai.api_server --model x"
        )),
        "already classified"
    );
    let mut grep = facts("grep torch requirements.txt");
    grep.libraries = pip.libraries.clone();
    assert_eq!(
        classify(&grep),
        None,
        "libraries only classify interpreters"
    );
}

#[test]
fn lineage() {
    let server = facts("/usr/bin/python3 -m vllm.entrypoints.openai.api_server --model meta-llama/Llama-3.1-8B-Instruct");
    let server_id = classify(&server).expect("server");
    let mut spawn = facts("/usr/bin/python3 -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5, pipe_handle=7) --multiprocessing-fork");
    spawn.ppid = server.pid;
    let worker = derive(&spawn, Some((&server, &server_id))).expect("spawned child inherits");
    assert_eq!(worker.role, Role::Worker);
    assert_eq!(worker.model_name, "meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(worker.framework, Framework::Vllm);

    for utility in [
        "/bin/sh -c nvidia-smi",
        "/usr/bin/gcc -O3 -shared cuda_utils.c",
        "/sbin/ldconfig -p",
    ] {
        assert_eq!(
            derive(&facts(utility), Some((&server, &server_id))),
            None,
            "{utility}"
        );
    }
    // A script's children inherit only when they are the same program re-executed.
    let script = facts("torchrun --nproc_per_node 2 gen.py");
    let script_id = classify(&script).unwrap();
    assert_eq!(
        derive(&facts("/usr/bin/htop"), Some((&script, &script_id))),
        None
    );
    let mut rank = facts("torchrun --nproc_per_node 2 gen.py");
    rank.argv = vec!["/usr/bin/python3".into(), "-u".into(), "gen.py".into()];
    let mut script_py = script.clone();
    script_py.exe = "/usr/bin/python3".into();
    rank.exe = "/usr/bin/python3".into();
    assert_eq!(
        derive(&rank, Some((&script_py, &script_id))).map(|i| i.role),
        Some(Role::Worker)
    );

    // A child that is an LLM process of another framework keeps its own identity.
    let ollama = facts("/usr/local/bin/ollama serve");
    let ollama_id = classify(&ollama).unwrap();
    let runner = facts(
        "/usr/local/bin/ollama runner --model /root/.ollama/models/blobs/sha256-aaaaaaaaaaaaaaaa",
    );
    let runner_id = derive(&runner, Some((&ollama, &ollama_id))).unwrap();
    assert_eq!(
        (runner_id.role, runner_id.model_name.as_str()),
        (Role::Worker, "unknown")
    );
}

#[test]
fn families() {
    for (model, family) in [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama"),
        ("Qwen/Qwen2.5-7B-Instruct", "qwen"),
        ("mistralai/Mixtral-8x7B-v0.1", "mistral"),
        ("microsoft/phi-2", "phi"),
        ("google/gemma-2-9b-it", "gemma"),
        ("openai/gpt-oss-20b", "gpt"),
        ("dolphin-2.9", "unknown"),
        ("unknown", "unknown"),
    ] {
        assert_eq!(model_family(model), family, "{model}");
    }
}

#[test]
fn labels_are_bounded_and_safe() {
    let huge = "a".repeat(10_000);
    assert_eq!(sanitize_label(&huge).len(), MAX_LABEL_LEN);
    assert_eq!(sanitize_label("ünïcödé name\n\0x"), "n_c_d_name_x");
    assert!(looks_like_secret("sk-ant-api03-xyz"));
    assert!(looks_like_secret("api_key=abc"));
    assert!(looks_like_secret(
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc"
    ));
    assert!(!looks_like_secret("meta-llama/Llama-3.1-8B-Instruct"));
    assert!(!looks_like_secret("qwen2.5-7b-instruct-q4_k_m"));
}

#[test]
fn signed_model_urls_keep_no_signature() {
    let f = facts(
        "llama-server -m https://user:pw@host/models/Llama-3.2-3B-Instruct-Q4_K_M.gguf?sig=SECRET#x",
    );
    let id = classify(&f).expect("llama-server");
    assert_eq!(id.model_name, "Llama-3.2-3B-Instruct-Q4_K_M");
}
