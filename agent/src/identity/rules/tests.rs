use super::*;

fn facts(cmdline: &str) -> ProcessFacts {
    let argv: Vec<String> = cmdline.split_whitespace().map(str::to_owned).collect();
    ProcessFacts {
        pid: 100,
        ppid: 1,
        comm: "comm".into(),
        exe: argv.first().cloned().unwrap_or_default(),
        argv,
        ..Default::default()
    }
}

const EXAMPLE: &str = r#"
rules:
  - name: acme-infer
    match:
      name: '^acme-infer$'
      argv: '--weights[ =](?P<model>\S+)'
    framework: acme-infer
    role: server
  - name: api-wrapper
    match:
      argv: '(^| )\S*api\.py( |$)'
      env: { ACME_MODEL: '(?P<model>.+)' }
    framework: transformers
  - name: vllm-is-not-for-this-user
    match: { exe: '^/home/alice/' }
    ignore: true
  - name: kernels
    match: { library: '/libacme_kernels\.so' }
    framework: acme-kernels
    model_name: house-model
"#;

fn identity(rules: &Rules, f: &ProcessFacts) -> Option<(String, String, String, String)> {
    match rules.decide(f)? {
        (i, Verdict::Classify(id)) => Some((
            rules.name(i).unwrap().to_owned(),
            id.framework.as_str().to_owned(),
            id.model_name,
            id.role.as_str().to_owned(),
        )),
        (i, Verdict::Ignore) => Some((
            rules.name(i).unwrap().to_owned(),
            "ignored".into(),
            String::new(),
            String::new(),
        )),
    }
}

fn tuple(
    rule: &str,
    fw: &str,
    model: &str,
    role: &str,
) -> Option<(String, String, String, String)> {
    Some((rule.into(), fw.into(), model.into(), role.into()))
}

#[test]
fn the_first_matching_rule_names_the_process_and_its_model_from_a_capture() {
    let rules = Rules::parse(EXAMPLE).unwrap();
    assert_eq!(rules.len(), 4);
    assert_eq!(
        identity(
            &rules,
            &facts("/opt/acme/bin/acme-infer --port 9000 --weights /models/ranker-v3.safetensors")
        ),
        tuple("acme-infer", "acme-infer", "ranker-v3", "server")
    );
    // A Hugging Face id keeps org/name; a secret-looking capture is dropped.
    assert_eq!(
        identity(&rules, &facts("acme-infer --weights=acme/ranker-7b")),
        tuple("acme-infer", "acme-infer", "acme/ranker-7b", "server")
    );
    assert_eq!(
        identity(
            &rules,
            &facts("acme-infer --weights hf_abcdefghijklmnopqrstuvwxyz0123")
        ),
        tuple("acme-infer", "acme-infer", "unknown", "server")
    );
    // Not the program the rule is about: `name` is the program's basename.
    assert_eq!(
        identity(&rules, &facts("grep acme-infer --weights x")),
        None
    );
}

#[test]
fn env_and_library_matchers_need_those_facts_and_say_so() {
    let rules = Rules::parse(EXAMPLE).unwrap();
    assert_eq!(rules.env_names(), ["ACME_MODEL"]);
    let mut api = facts("/usr/bin/python3 /srv/api.py --port 8000");
    assert_eq!(
        rules.needs(&api),
        Needs {
            env: true,
            // The library rule has no command-line matcher: every process may be it.
            libraries: true
        }
    );
    assert_eq!(identity(&rules, &api), None, "ACME_MODEL not read yet");
    api.env = vec![("ACME_MODEL".into(), "/models/qwen2.5-7b-instruct".into())];
    assert_eq!(
        identity(&rules, &api),
        tuple(
            "api-wrapper",
            "transformers",
            "qwen2.5-7b-instruct",
            "server"
        )
    );
    let mut lib = facts("/usr/bin/python3 train.py");
    assert!(!rules.needs(&lib).env);
    lib.libraries = vec!["/opt/acme/lib/libacme_kernels.so".into()];
    assert_eq!(
        identity(&rules, &lib),
        tuple("kernels", "acme-kernels", "house-model", "server")
    );
}

#[test]
fn an_ignore_rule_wins_over_the_built_in_rules() {
    let rules = Rules::parse(EXAMPLE).unwrap();
    let f = facts("/home/alice/venv/bin/vllm serve meta-llama/Llama-3.1-8B");
    assert!(
        super::super::classify(&f).is_some(),
        "built-in rules pick it"
    );
    assert_eq!(
        identity(&rules, &f),
        tuple("vllm-is-not-for-this-user", "ignored", "", "")
    );
}

#[test]
fn a_built_in_framework_name_is_that_framework() {
    let rules =
        Rules::parse("rules: [{name: w, match: {name: '^serve\\.sh$'}, framework: vllm}]").unwrap();
    let (_, Verdict::Classify(id)) = rules.decide(&facts("/srv/serve.sh")).unwrap() else {
        panic!("classified");
    };
    assert_eq!(id.framework, Framework::Vllm);
}

fn problems(text: &str) -> String {
    Rules::parse(text).unwrap_err().join("\n")
}

#[test]
fn every_problem_of_a_bad_file_is_reported_with_its_rule() {
    let text = r#"
rules:
  - name: ok
    match: { name: x }
    framework: x
  - name: bad regex
    match: { argv: '(unclosed' }
    framework: x
  - name: everything
    match: {}
    framework: x
  - name: ok
    match: { name: y }
    framework: y
  - name: both
    match: { name: z }
    ignore: true
    framework: vllm
  - name: shouting
    match: { name: z, env: { "1BAD": '.' } }
    framework: NOT-LOWER
"#;
    let p = problems(text);
    for want in [
        "rule 2 (\"bad regex\"): name: 1 to 64 characters",
        "rule 2 (\"bad regex\"): match.argv: regex parse error",
        "rule 3 (\"everything\"): match: give at least one",
        "rule 4 (\"ok\"): a rule of this name comes earlier",
        "rule 5 (\"both\"): ignore: true excludes the process",
        "rule 6 (\"shouting\"): match.env: \"1BAD\" is not a variable name",
        "rule 6 (\"shouting\"): framework: \"NOT-LOWER\" is neither",
    ] {
        assert!(p.contains(want), "{want:?} not in:\n{p}");
    }
    assert!(!p.contains("rule 1 "), "{p}");
}

#[test]
fn malformed_and_oversized_input_is_refused_with_a_reason() {
    assert!(problems("rules: [").contains("did not find expected"));
    assert!(problems("rule: []").contains("unknown field `rule`"));
    assert!(
        problems("rules: [{name: a, match: {nmae: x}, framework: x}]")
            .contains("unknown field `nmae`")
    );
    assert!(
        problems("rules: [{name: a, match: {name: x}, framework: x, role: boss}]")
            .contains("unknown variant `boss`")
    );
    let many: String = (0..=MAX_RULES)
        .map(|i| format!("  - {{name: r{i}, match: {{name: x}}, framework: x}}\n"))
        .collect();
    assert!(problems(&format!("rules:\n{many}")).contains("at most 256"));
    let long = "a".repeat(MAX_PATTERN_BYTES + 1);
    assert!(problems(&format!(
        "rules: [{{name: a, match: {{name: {long}}}, framework: x}}]"
    ))
    .contains("at most 4096"));
    // A short pattern that compiles to a huge program: refused when read, never run.
    assert!(
        problems(r#"rules: [{name: a, match: {argv: '\w{1000}\w{1000}'}, framework: x}]"#)
            .contains("compiles to more than"),
        "{}",
        problems(r#"rules: [{name: a, match: {argv: '\w{1000}\w{1000}'}, framework: x}]"#)
    );
}

#[test]
fn the_file_is_read_again_only_when_it_changes_and_a_bad_version_is_reported_once() {
    let dir = std::env::temp_dir().join(format!("llmscope-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rules.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    let (mut file, rules) = RulesFile::load(&path).unwrap();
    assert_eq!(rules.len(), 4);
    assert!(file.reload_if_changed().is_none());
    std::fs::write(&path, "rules: [").unwrap();
    let err = file.reload_if_changed().unwrap().unwrap_err();
    assert_eq!(err.file, path);
    assert!(err.to_string().starts_with(&path.display().to_string()));
    assert!(file.reload_if_changed().is_none(), "reported once");
    std::fs::write(&path, "rules: [{name: a, match: {name: x}, framework: x}]").unwrap();
    assert_eq!(file.reload_if_changed().unwrap().unwrap().len(), 1);
    std::fs::remove_file(&path).unwrap();
    assert!(file.reload_if_changed().unwrap().is_err(), "gone: reported");
    assert!(file.reload_if_changed().is_none(), "once");
    std::fs::write(&path, vec![0xff; 10]).unwrap();
    let err = file.reload_if_changed().unwrap().unwrap_err();
    assert!(err.to_string().contains("cannot read"), "{err}");
    std::fs::write(&path, "x".repeat(MAX_FILE_BYTES + 1)).unwrap();
    let err = file.reload_if_changed().unwrap().unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
