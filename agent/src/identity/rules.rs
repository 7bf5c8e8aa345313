//! User classification rules (`--classify.rules FILE`): ordered rules that name what the
//! built-in rules cannot (an in-house server, a FastAPI wrapper) or exclude what they pick
//! wrongly. They are tried before the built-in rules; the first rule whose every matcher
//! matches decides. Pure (no /proc, no clock) like the rest of `identity`; reading the file
//! and noticing its changes is [`RulesFile`]'s.
//!
//! ```yaml
//! rules:
//!   - name: acme-infer
//!     match:
//!       name: '^acme-infer$'
//!       argv: '--weights[ =](?P<model>\S+)'
//!     framework: acme-infer
//!     role: server
//!   - name: notebooks
//!     match: { argv: 'jupyter' }
//!     ignore: true
//! ```

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

use super::{model::normalise, Framework, Identity, ProcessFacts, Role};

/// Rules in one file at most.
pub const MAX_RULES: usize = 256;
/// Bytes of rules file read at most.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Longest pattern, in bytes.
const MAX_PATTERN_BYTES: usize = 4096;
/// What one compiled pattern may take (the `regex` crate's own limits: a pattern that needs
/// more is refused when the file is read, never slows a match down).
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
const DFA_SIZE_LIMIT: usize = 1 << 20;
/// Environment variables one rule may match on.
const MAX_ENV_PER_RULE: usize = 16;
/// Longest rule name (it is a label value).
const MAX_NAME_LEN: usize = 64;
/// The capture group whose text names the model.
pub const MODEL_GROUP: &str = "model";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(rename = "match")]
    matchers: RawMatch,
    #[serde(default)]
    ignore: bool,
    framework: Option<String>,
    role: Option<Role>,
    model_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    exe: Option<String>,
    name: Option<String>,
    argv: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    library: Option<String>,
}

/// What a matching rule says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not an LLM process, whatever the built-in rules say (nor tracked as a GPU user).
    Ignore,
    Classify(Identity),
}

/// Facts a rule needs that the caller may not have read yet: asked before [`Rules::decide`]
/// so that only processes some rule is about cost a read of their environment or maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub env: bool,
    pub libraries: bool,
}

#[derive(Debug)]
struct Rule {
    name: String,
    exe: Option<Regex>,
    program: Option<Regex>,
    argv: Option<Regex>,
    env: Vec<(String, Regex)>,
    library: Option<Regex>,
    action: Action,
}

#[derive(Debug)]
enum Action {
    Ignore,
    Classify {
        framework: Framework,
        role: Role,
        model_name: Option<String>,
    },
}

/// A rules file, compiled.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    /// Every variable some rule matches on: the only ones read from a process's environment
    /// for the rules.
    env_names: Vec<String>,
}

/// What is wrong with a rules file: each problem, with the rule it is in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", file.display(), problems.join("; "))]
pub struct RulesError {
    pub file: PathBuf,
    pub problems: Vec<String>,
}

impl Rules {
    /// Compiles a rules file's text; every problem is reported, not only the first.
    pub fn parse(text: &str) -> Result<Rules, Vec<String>> {
        let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|e| vec![e.to_string()])?;
        if raw.rules.len() > MAX_RULES {
            return Err(vec![format!(
                "{} rules: at most {MAX_RULES} are allowed",
                raw.rules.len()
            )]);
        }
        let mut problems = Vec::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, raw) in raw.rules.into_iter().enumerate() {
            let at = format!("rule {} ({:?})", i + 1, raw.name);
            if rules.iter().any(|r: &Rule| r.name == raw.name) {
                problems.push(format!("{at}: a rule of this name comes earlier"));
                continue;
            }
            match Rule::compile(raw) {
                Ok(rule) => rules.push(rule),
                Err(reasons) => problems.extend(reasons.into_iter().map(|r| format!("{at}: {r}"))),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut env_names: Vec<String> = rules
            .iter()
            .flat_map(|r| r.env.iter().map(|(k, _)| k.clone()))
            .collect();
        env_names.sort();
        env_names.dedup();
        Ok(Rules { rules, env_names })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules' names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// The environment variables the rules match on.
    pub fn env_names(&self) -> &[String] {
        &self.env_names
    }

    /// Whether some rule that the command line already matches also matches on the
    /// environment or the mapped libraries.
    pub fn needs(&self, facts: &ProcessFacts) -> Needs {
        let view = View::new(facts);
        let mut needs = Needs::default();
        for rule in self.rules.iter().filter(|r| r.matches_command(&view)) {
            needs.env |= !rule.env.is_empty();
            needs.libraries |= rule.library.is_some();
        }
        needs
    }

    /// The first rule that matches `facts`: its index and what it says.
    pub fn decide(&self, facts: &ProcessFacts) -> Option<(usize, Verdict)> {
        let view = View::new(facts);
        self.rules.iter().enumerate().find_map(|(i, rule)| {
            let model = rule.matches(&view, facts)?;
            Some((i, rule.verdict(model)))
        })
    }

    /// The name of rule `index` (from [`Rules::decide`]).
    pub fn name(&self, index: usize) -> Option<&str> {
        self.rules.get(index).map(|r| r.name.as_str())
    }
}

/// The parts of the facts the rules look at.
struct View<'a> {
    exe: &'a str,
    program: &'a str,
    argv: String,
}

impl<'a> View<'a> {
    fn new(facts: &'a ProcessFacts) -> Self {
        let argv0 = facts.argv.first().map(String::as_str).unwrap_or("");
        let path = if argv0.is_empty() { &facts.exe } else { argv0 };
        let program = path.rsplit(['/', '\\']).next().unwrap_or(path);
        View {
            exe: &facts.exe,
            program: if program.is_empty() {
                &facts.comm
            } else {
                program
            },
            argv: facts.argv.join(" "),
        }
    }
}

/// Whether `re` (when given) matches `text`; a `model` group it captured is kept in `model`
/// unless an earlier matcher captured one.
fn check(re: Option<&Regex>, text: &str, model: &mut Option<String>) -> bool {
    let Some(re) = re else {
        return true;
    };
    let Some(caps) = re.captures(text) else {
        return false;
    };
    if model.is_none() {
        *model = caps.name(MODEL_GROUP).map(|m| m.as_str().to_owned());
    }
    true
}

impl Rule {
    fn compile(raw: RawRule) -> Result<Rule, Vec<String>> {
        let mut problems = Vec::new();
        let name_ok = (1..=MAX_NAME_LEN).contains(&raw.name.len())
            && raw
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !name_ok {
            problems.push(format!(
                "name: 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9._-] (it is a label value)"
            ));
        }
        let mut pattern = |what: &str, p: Option<&String>| -> Option<Regex> {
            compile(p?)
                .map_err(|e| problems.push(format!("{what}: {e}")))
                .ok()
        };
        let m = &raw.matchers;
        let exe = pattern("match.exe", m.exe.as_ref());
        let program = pattern("match.name", m.name.as_ref());
        let argv = pattern("match.argv", m.argv.as_ref());
        let library = pattern("match.library", m.library.as_ref());
        let mut env = Vec::new();
        for (var, p) in &m.env {
            if let Some(re) = pattern(&format!("match.env.{var}"), Some(p)) {
                env.push((var.clone(), re));
            }
        }
        if m.env.len() > MAX_ENV_PER_RULE {
            problems.push(format!("match.env: at most {MAX_ENV_PER_RULE} variables"));
        }
        for var in m.env.keys() {
            let valid = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                problems.push(format!("match.env: {var:?} is not a variable name"));
            }
        }
        if m.exe.is_none()
            && m.name.is_none()
            && m.argv.is_none()
            && m.env.is_empty()
            && m.library.is_none()
        {
            problems.push(
                "match: give at least one of exe, name, argv, env, library (a rule that matches \
                 every process is refused)"
                    .to_owned(),
            );
        }
        let action = if raw.ignore {
            if raw.framework.is_some() || raw.role.is_some() || raw.model_name.is_some() {
                problems.push(
                    "ignore: true excludes the process; framework, role and model_name do not go \
                     with it"
                        .to_owned(),
                );
            }
            Action::Ignore
        } else {
            let framework = match raw.framework.as_deref() {
                None => {
                    problems.push("framework: missing (or ignore: true)".to_owned());
                    Framework::Unknown
                }
                Some(name) => Framework::named(name).unwrap_or_else(|| {
                    problems.push(format!(
                        "framework: {name:?} is neither a built-in framework nor 1 to {} \
                         characters of [a-z0-9._-]",
                        super::CustomName::MAX_LEN
                    ));
                    Framework::Unknown
                }),
            };
            let model_name = match raw.model_name.as_deref() {
                None => None,
                Some(literal) => {
                    let normalised = normalise(literal);
                    if normalised.is_none() {
                        problems.push(format!(
                            "model_name: {literal:?} is not a model name (empty, or looks like a \
                             secret)"
                        ));
                    }
                    normalised
                }
            };
            Action::Classify {
                framework,
                role: raw.role.unwrap_or(Role::Server),
                model_name,
            }
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Rule {
            name: raw.name,
            exe,
            program,
            argv,
            env,
            library,
            action,
        })
    }

    /// The matchers on the command line alone.
    fn matches_command(&self, view: &View) -> bool {
        let mut unused = Some(String::new());
        check(self.exe.as_ref(), view.exe, &mut unused)
            && check(self.program.as_ref(), view.program, &mut unused)
            && check(self.argv.as_ref(), &view.argv, &mut unused)
    }

    /// Whether every matcher matches; the model text the first `model` group captured.
    fn matches(&self, view: &View, facts: &ProcessFacts) -> Option<Option<String>> {
        let mut model = None;
        let command = check(self.exe.as_ref(), view.exe, &mut model)
            && check(self.program.as_ref(), view.program, &mut model)
            && check(self.argv.as_ref(), &view.argv, &mut model);
        if !command {
            return None;
        }
        for (var, re) in &self.env {
            let value = facts.env.iter().find(|(k, _)| k == var)?;
            if !check(Some(re), &value.1, &mut model) {
                return None;
            }
        }
        if let Some(re) = &self.library {
            let found = facts
                .libraries
                .iter()
                .any(|lib| check(Some(re), lib, &mut model));
            if !found {
                return None;
            }
        }
        Some(model)
    }

    fn verdict(&self, captured: Option<String>) -> Verdict {
        match &self.action {
            Action::Ignore => Verdict::Ignore,
            Action::Classify {
                framework,
                role,
                model_name,
            } => {
                let model = captured
                    .as_deref()
                    .and_then(normalise)
                    .or_else(|| model_name.clone());
                Verdict::Classify(Identity::new(*framework, *role, model))
            }
        }
    }
}

fn compile(pattern: &str) -> Result<Regex, String> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(format!(
            "pattern of {} bytes: at most {MAX_PATTERN_BYTES}",
            pattern.len()
        ));
    }
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(DFA_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => {
                format!("the pattern compiles to more than {limit} bytes: simplify it")
            }
            e => e.to_string(),
        })
}

/// What identifies a version of the file: a change to any of them is a change to reload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    // `metadata` follows links: a Kubernetes ConfigMap swaps the link's target.
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        #[cfg(unix)]
        inode: std::os::unix::fs::MetadataExt::ino(&m),
    })
}

/// The rules file on disk: read at start-up, read again when it changes.
#[derive(Debug)]
pub struct RulesFile {
    path: PathBuf,
    /// The version last read (good or bad): a bad file is reported once, not at each check.
    seen: Option<Stamp>,
}

impl RulesFile {
    /// Reads and compiles the file.
    pub fn load(path: &Path) -> Result<(RulesFile, Rules), RulesError> {
        let mut file = RulesFile {
            path: path.to_owned(),
            seen: None,
        };
        let rules = file.read()?;
        Ok((file, rules))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's rules when it changed since the last read: `Ok` to use them, `Err` to keep
    /// the rules in use and report why. None: unchanged.
    pub fn reload_if_changed(&mut self) -> Option<Result<Rules, RulesError>> {
        let now = stamp(&self.path).ok();
        if now.is_some() && now == self.seen {
            return None;
        }
        if now.is_none() && self.seen.is_none() {
            // Still missing: reported when it went.
            return None;
        }
        Some(self.read())
    }

    fn read(&mut self) -> Result<Rules, RulesError> {
        let error = |problems: Vec<String>| RulesError {
            file: self.path.clone(),
            problems,
        };
        self.seen = stamp(&self.path).ok();
        let mut text = String::new();
        let read = std::fs::File::open(&self.path)
            .and_then(|f| f.take(MAX_FILE_BYTES as u64 + 1).read_to_string(&mut text));
        if let Err(e) = read {
            return Err(error(vec![format!("cannot read: {e}")]));
        }
        if text.len() > MAX_FILE_BYTES {
            return Err(error(vec![format!("larger than {MAX_FILE_BYTES} bytes")]));
        }
        Rules::parse(&text).map_err(error)
    }
}

#[cfg(test)]
mod tests;
