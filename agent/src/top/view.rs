//! What `llmscope top` shows, as plain text: pure functions of two snapshots (rates are
//! taken between them), the sort, the filter and the width — so the screen and `--once`
//! are the same table, and both are tested without a terminal.

use std::collections::{BTreeMap, HashMap};

use crate::api::{Node, Process};

/// What the rows are ordered by (`s` cycles through them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    Cpu,
    Memory,
    Gpu,
    Launches,
    Requests,
    Pid,
    Model,
}

impl SortKey {
    pub const ALL: [SortKey; 7] = [
        SortKey::Cpu,
        SortKey::Memory,
        SortKey::Gpu,
        SortKey::Launches,
        SortKey::Requests,
        SortKey::Pid,
        SortKey::Model,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SortKey::Cpu => "cpu",
            SortKey::Memory => "memory",
            SortKey::Gpu => "gpu",
            SortKey::Launches => "launches",
            SortKey::Requests => "requests",
            SortKey::Pid => "pid",
            SortKey::Model => "model",
        }
    }

    pub fn next(self) -> SortKey {
        let i = SortKey::ALL.iter().position(|k| *k == self).unwrap_or(0);
        SortKey::ALL[(i + 1) % SortKey::ALL.len()]
    }
}

/// How the table is ordered and which rows it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub sort: SortKey,
    /// Smallest first (numeric keys are largest first otherwise; pid and model the reverse).
    pub reverse: bool,
    /// Rows whose pid, name, framework, model, role, container, pod or namespace contain it
    /// (case-insensitive), with their servers above them.
    pub filter: String,
}

/// Per-second rates of one process between two snapshots (None: not in the earlier one, or
/// nothing to measure).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub launches: Option<f64>,
    pub copy_bytes: Option<f64>,
    /// Percent of the time its threads waited in CUDA synchronize calls.
    pub sync_percent: Option<f64>,
    pub requests: Option<f64>,
    /// Mean request duration over the interval, seconds.
    pub latency: Option<f64>,
}

fn rates(now: &Process, before: Option<&Process>, seconds: f64) -> Rates {
    let Some(before) = before.filter(|b| b.start_time_seconds == now.start_time_seconds) else {
        return Rates::default();
    };
    if seconds <= 0.0 {
        return Rates::default();
    }
    let per_second = |a: f64, b: f64| Some(((a - b) / seconds).max(0.0));
    let mut r = Rates::default();
    if let (Some(c), Some(p)) = (&now.cuda, &before.cuda) {
        r.launches = per_second(c.kernel_launches, p.kernel_launches);
        r.copy_bytes = per_second(c.memcpy_bytes, p.memcpy_bytes);
        r.sync_percent = per_second(c.sync_seconds, p.sync_seconds).map(|s| s * 100.0);
    }
    if let (Some(c), Some(p)) = (&now.requests, &before.requests) {
        let n = c.requests.saturating_sub(p.requests);
        r.requests = per_second(c.requests as f64, p.requests as f64);
        r.latency = (n > 0).then(|| (c.duration_seconds_sum - p.duration_seconds_sum) / n as f64);
    }
    r
}

/// One line of the table: a process, how deep under its server, and its rates.
#[derive(Debug, Clone)]
pub struct Row<'a> {
    pub depth: usize,
    pub process: &'a Process,
    pub rates: Rates,
}

fn sort_value(p: &Process, r: &Rates, key: SortKey) -> f64 {
    match key {
        SortKey::Cpu => p.cpu_percent.unwrap_or(0.0),
        SortKey::Memory => p.memory_bytes as f64,
        SortKey::Gpu => gpu_memory(p).unwrap_or(0.0),
        SortKey::Launches => r.launches.unwrap_or(0.0),
        SortKey::Requests => r.requests.unwrap_or(0.0),
        SortKey::Pid => f64::from(p.pid),
        SortKey::Model => 0.0,
    }
}

/// GPU memory: NVML's figure, else the CUDA probes' live allocations.
fn gpu_memory(p: &Process) -> Option<f64> {
    p.gpu
        .as_ref()
        .and_then(|g| g.memory_bytes)
        .or_else(|| p.cuda.as_ref().map(|c| c.device_memory_bytes as f64))
}

fn matches(p: &Process, filter: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let f = filter.to_lowercase();
    [
        &p.pid.to_string(),
        &p.name,
        &p.framework,
        &p.model_name,
        &p.role,
        &p.container,
        &p.pod,
        &p.namespace,
    ]
    .iter()
    .any(|v| v.to_lowercase().contains(&f))
}

/// The rows in display order: each process under its parent when the parent is tracked too
/// (a server, then its workers), groups ordered by the sort key summed over the group.
pub fn rows<'a>(now: &'a Node, before: Option<(&Node, f64)>, options: &Options) -> Vec<Row<'a>> {
    let earlier: HashMap<u32, &Process> = before
        .map(|(n, _)| n.processes.iter().map(|p| (p.pid, p)).collect())
        .unwrap_or_default();
    let seconds = before.map_or(0.0, |(_, s)| s);
    let by_pid: HashMap<u32, &Process> = now.processes.iter().map(|p| (p.pid, p)).collect();
    let parent = |p: &Process| (p.ppid != p.pid && by_pid.contains_key(&p.ppid)).then_some(p.ppid);
    let mut children: BTreeMap<u32, Vec<&Process>> = BTreeMap::new();
    let mut roots = Vec::new();
    for p in &now.processes {
        match parent(p) {
            Some(pp) => children.entry(pp).or_default().push(p),
            None => roots.push(p),
        }
    }
    let rate_of: HashMap<u32, Rates> = now
        .processes
        .iter()
        .map(|p| (p.pid, rates(p, earlier.get(&p.pid).copied(), seconds)))
        .collect();
    // A group's sort value, and whether anything in it passes the filter.
    fn group(
        p: &Process,
        children: &BTreeMap<u32, Vec<&Process>>,
        rate_of: &HashMap<u32, Rates>,
        options: &Options,
        depth: usize,
    ) -> (f64, bool) {
        let own = sort_value(p, &rate_of[&p.pid], options.sort);
        let mut kept = matches(p, &options.filter);
        let mut total = own;
        // A cycle cannot come from pids, but a bound costs nothing.
        if depth < 32 {
            for c in children.get(&p.pid).into_iter().flatten() {
                let (v, k) = group(c, children, rate_of, options, depth + 1);
                total += v;
                kept |= k;
            }
        }
        (total, kept)
    }
    let order = |list: &mut Vec<(&'a Process, f64)>| {
        list.sort_by(|(a, av), (b, bv)| {
            let ordering = match options.sort {
                SortKey::Pid => a.pid.cmp(&b.pid),
                SortKey::Model => a.model_name.cmp(&b.model_name).then(a.pid.cmp(&b.pid)),
                _ => bv.total_cmp(av).then(a.pid.cmp(&b.pid)),
            };
            if options.reverse {
                ordering.reverse()
            } else {
                ordering
            }
        });
    };
    let mut out = Vec::new();
    let mut stack: Vec<(usize, Vec<(&'a Process, f64)>)> = Vec::new();
    let mut top: Vec<(&'a Process, f64)> = roots
        .into_iter()
        .filter_map(|p| {
            let (v, kept) = group(p, &children, &rate_of, options, 0);
            kept.then_some((p, v))
        })
        .collect();
    order(&mut top);
    top.reverse();
    stack.push((0, top));
    while let Some((depth, mut level)) = stack.pop() {
        let Some((p, _)) = level.pop() else {
            continue;
        };
        stack.push((depth, level));
        out.push(Row {
            depth,
            process: p,
            rates: rate_of[&p.pid],
        });
        if depth < 32 {
            let mut kids: Vec<(&'a Process, f64)> = children
                .get(&p.pid)
                .into_iter()
                .flatten()
                .filter_map(|c| {
                    let (v, kept) = group(c, &children, &rate_of, options, depth + 1);
                    kept.then_some((*c, v))
                })
                .collect();
            order(&mut kids);
            kids.reverse();
            stack.push((depth + 1, kids));
        }
    }
    out
}

/// A byte count as the table shows it: `512B`, `64K`, `1.5G`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v >= 100.0 {
        format!("{v:.0}{}", UNITS[unit])
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// A rate or count: `950`, `12.3k`, `4.1M`.
pub fn count(n: f64) -> String {
    if n < 1000.0 {
        return if n < 10.0 && n.fract() != 0.0 {
            format!("{n:.1}")
        } else {
            format!("{n:.0}")
        };
    }
    let (v, unit) = if n < 1e6 {
        (n / 1e3, "k")
    } else if n < 1e9 {
        (n / 1e6, "M")
    } else {
        (n / 1e9, "G")
    };
    if v >= 100.0 {
        format!("{v:.0}{unit}")
    } else {
        format!("{v:.1}{unit}")
    }
}

const NONE: &str = "-";

fn opt(v: Option<f64>, f: fn(f64) -> String) -> String {
    v.map_or_else(|| NONE.to_owned(), f)
}

/// One column: its title, width (the model's is the least it gets), alignment and value.
struct Column {
    title: &'static str,
    width: usize,
    right: bool,
    value: fn(&Row) -> String,
}

/// Every column, in display order.
const COLUMNS: [Column; 16] = [
    Column {
        title: "PID",
        width: 7,
        right: true,
        value: |r| r.process.pid.to_string(),
    },
    Column {
        title: "PROCESS",
        width: 13,
        right: false,
        value: |r| {
            let tree = if r.depth == 0 {
                String::new()
            } else {
                format!("{}└ ", "  ".repeat(r.depth - 1))
            };
            format!("{tree}{}", r.process.name)
        },
    },
    Column {
        title: "FRAMEWORK",
        width: 10,
        right: false,
        value: |r| r.process.framework.clone(),
    },
    Column {
        title: "ROLE",
        width: 6,
        right: false,
        value: |r| r.process.role.clone(),
    },
    Column {
        title: "MODEL",
        width: 12,
        right: false,
        value: |r| r.process.model_name.clone(),
    },
    Column {
        title: "POD/CONTAINER",
        width: 16,
        right: false,
        value: |r| {
            let p = r.process;
            match (p.pod.as_str(), p.container.as_str()) {
                ("", "") => NONE.to_owned(),
                ("", c) => c.to_owned(),
                (pod, _) if p.namespace.is_empty() => pod.to_owned(),
                (pod, _) => format!("{}/{pod}", p.namespace),
            }
        },
    },
    Column {
        title: "CPU%",
        width: 4,
        right: true,
        value: |r| opt(r.process.cpu_percent, |v| format!("{v:.0}")),
    },
    Column {
        title: "RSS",
        width: 6,
        right: true,
        value: |r| bytes(r.process.memory_bytes as f64),
    },
    Column {
        title: "GPUMEM",
        width: 7,
        right: true,
        value: |r| opt(r.process.gpu.as_ref().and_then(|g| g.memory_bytes), bytes),
    },
    Column {
        title: "CUDAMEM",
        width: 7,
        right: true,
        value: |r| {
            opt(
                r.process
                    .cuda
                    .as_ref()
                    .map(|c| c.device_memory_bytes as f64),
                bytes,
            )
        },
    },
    Column {
        title: "LNCH/s",
        width: 7,
        right: true,
        value: |r| opt(r.rates.launches, count),
    },
    Column {
        title: "COPY/s",
        width: 7,
        right: true,
        value: |r| opt(r.rates.copy_bytes, bytes),
    },
    Column {
        title: "SYNC%",
        width: 5,
        right: true,
        value: |r| opt(r.rates.sync_percent, |v| format!("{v:.0}")),
    },
    Column {
        title: "OOM",
        width: 4,
        right: true,
        value: |r| opt(r.process.cuda.as_ref().map(|c| c.ooms as f64), count),
    },
    Column {
        title: "REQ/s",
        width: 6,
        right: true,
        value: |r| opt(r.rates.requests, count),
    },
    Column {
        title: "LAT",
        width: 7,
        right: true,
        value: |r| {
            opt(r.rates.latency, |s| {
                if s < 1.0 {
                    format!("{:.0}ms", s * 1e3)
                } else {
                    format!("{s:.1}s")
                }
            })
        },
    },
];

/// Which columns a width shows, most useful first (at 80 columns: pid, process, model, CPU,
/// RSS, GPU memory, framework, launches/s and requests/s).
const PRIORITY: [&str; 16] = [
    "PID",
    "PROCESS",
    "MODEL",
    "CPU%",
    "RSS",
    "GPUMEM",
    "FRAMEWORK",
    "LNCH/s",
    "REQ/s",
    "LAT",
    "CUDAMEM",
    "ROLE",
    "POD/CONTAINER",
    "COPY/s",
    "SYNC%",
    "OOM",
];

/// The widest the model column grows to.
const MODEL_MAX: usize = 40;

/// The columns shown in `width` (None: all, the model up to its widest), with their widths.
fn layout(width: Option<usize>) -> Vec<(&'static Column, usize)> {
    let Some(width) = width else {
        return COLUMNS
            .iter()
            .map(|c| {
                (
                    c,
                    if c.title == "MODEL" {
                        MODEL_MAX
                    } else {
                        c.width
                    },
                )
            })
            .collect();
    };
    let mut used = 0;
    let mut shown: Vec<&str> = Vec::new();
    for title in PRIORITY {
        let c = COLUMNS.iter().find(|c| c.title == title).expect("a column");
        let need = c.width + usize::from(!shown.is_empty());
        if used + need <= width {
            used += need;
            shown.push(title);
        }
    }
    let spare = width.saturating_sub(used);
    COLUMNS
        .iter()
        .filter(|c| shown.contains(&c.title))
        .map(|c| match c.title {
            "MODEL" => (c, (c.width + spare).min(MODEL_MAX)),
            _ => (c, c.width),
        })
        .collect()
}

/// Cuts `s` to `width` characters (an ellipsis marks the cut) and pads it.
fn cell(s: &str, width: usize, right: bool) -> String {
    let n = s.chars().count();
    let text = if n > width && width > 1 {
        let mut cut: String = s.chars().take(width - 1).collect();
        cut.push('…');
        cut
    } else {
        s.to_owned()
    };
    if right {
        format!("{text:>width$}")
    } else {
        format!("{text:<width$}")
    }
}

/// The table's header and its lines, fitted to `width` columns (None: every column).
pub fn table(rows: &[Row], width: Option<usize>) -> (String, Vec<String>) {
    let columns = layout(width);
    let line = |cells: Vec<String>| cells.join(" ").trim_end().to_owned();
    let header = line(
        columns
            .iter()
            .map(|(c, w)| cell(c.title, *w, c.right))
            .collect(),
    );
    let lines = rows
        .iter()
        .map(|r| {
            line(
                columns
                    .iter()
                    .map(|(c, w)| {
                        let value = (c.value)(r);
                        // A Hugging Face id too long for its column: its name says more
                        // than its organisation.
                        let value = match value.rsplit_once('/') {
                            Some((_, name)) if c.title == "MODEL" && value.chars().count() > *w => {
                                name.to_owned()
                            }
                            _ => value,
                        };
                        cell(&value, *w, c.right)
                    })
                    .collect(),
            )
        })
        .collect();
    (header, lines)
}

/// One line per GPU: utilisation, memory, temperature, power.
pub fn gpu_lines(node: &Node) -> Vec<String> {
    if node.gpus.is_empty() {
        return vec!["GPU  none seen by NVML".to_owned()];
    }
    node.gpus
        .iter()
        .map(|g| {
            let memory = match (g.memory_used_bytes, g.memory_total_bytes) {
                (Some(u), Some(t)) => format!("{}/{}", bytes(u), bytes(t)),
                (Some(u), None) => bytes(u),
                _ => NONE.to_owned(),
            };
            format!(
                "GPU {} {}  util {}  mem {}  {}  {}",
                g.index,
                g.name,
                opt(g.utilization_percent, |v| format!("{v:.0}%")),
                memory,
                opt(g.temperature_celsius, |v| format!("{v:.0}°C")),
                opt(g.power_watts, |v| format!("{v:.0}W")),
            )
        })
        .collect()
}

/// `--once`: the GPU lines, a blank line and the whole table, as plain text.
pub fn plain(now: &Node, before: Option<(&Node, f64)>, options: &Options) -> String {
    let rows = rows(now, before, options);
    let (header, lines) = table(&rows, None);
    let mut out = gpu_lines(now).join("\n");
    out.push_str("\n\n");
    out.push_str(&header);
    out.push('\n');
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
