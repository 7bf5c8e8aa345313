//! `llmscope top`: a live terminal view of one agent — its GPUs, and its processes grouped
//! server → workers with their CPU, memory, GPU memory, CUDA work and requests — read from
//! the agent's JSON API (`/api/v1/processes`), never from the metrics text. A subcommand of
//! the agent's binary: one install, on every node the DaemonSet runs
//! (`kubectl exec ds/llmscope -- llmscope top`), and the same HTTP client as the agent's.

mod client;
mod view;

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::api::Node;
use view::Options;
pub use view::SortKey;

/// The shortest `--interval`.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// `llmscope top`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// The agent to watch: http://HOST:PORT or https://HOST:PORT.
    #[arg(long, env = "LLMSCOPE_TOP_URL")]
    pub url: Option<String>,

    /// The agent's own web configuration: with it, the default URL is https and the
    /// certificate it serves is the one trusted.
    #[arg(long = "web.config.file", env = "LLMSCOPE_WEB_CONFIG_FILE")]
    pub web_config_file: Option<PathBuf>,

    /// PEM certificates to trust for an https URL.
    #[arg(long = "tls.ca-file", env = "LLMSCOPE_TOP_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Basic-auth user; the password comes from LLMSCOPE_TOP_PASSWORD or --password-file
    /// (never a flag: other users can read command lines).
    #[arg(long, env = "LLMSCOPE_TOP_USER")]
    pub user: Option<String>,

    /// A file holding the basic-auth password (its first line).
    #[arg(long)]
    pub password_file: Option<PathBuf>,

    /// Time between two readings (and, with --once, between the two it takes for rates).
    #[arg(long, default_value = "1s", value_parser = crate::config::parse_duration)]
    pub interval: Duration,

    /// What the rows are ordered by.
    #[arg(long, value_enum, default_value_t = SortKey::Cpu)]
    pub sort: SortKey,

    /// Only rows that contain this (pid, name, framework, model, role, container, pod).
    #[arg(long, default_value = "")]
    pub filter: String,

    /// Print one plain table (two readings --interval apart, for the rates) and exit.
    #[arg(long)]
    pub once: bool,
}

/// Runs `top` until `q`; an error is for the user (exit code 1 with --once, 2 for flags).
pub fn run(args: TopArgs, listen: std::net::SocketAddr) -> Result<(), String> {
    if args.interval < MIN_INTERVAL {
        return Err(format!(
            "--interval {:?}: at least {MIN_INTERVAL:?} (each reading costs the agent a scrape's work)",
            args.interval
        ));
    }
    let client = client_for(&args, listen)?;
    let options = Options {
        sort: args.sort,
        reverse: false,
        filter: args.filter.clone(),
    };
    if args.once {
        let first = client.fetch().map_err(|e| format!("{}: {e}", client.url))?;
        let taken = Instant::now();
        std::thread::sleep(args.interval);
        let second = client.fetch().map_err(|e| format!("{}: {e}", client.url))?;
        let seconds = taken.elapsed().as_secs_f64();
        let text = view::plain(&second, Some((&first, seconds)), &options);
        let mut out = std::io::stdout().lock();
        return out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"));
    }
    live(client, args.interval, options)
}

fn client_for(args: &TopArgs, listen: std::net::SocketAddr) -> Result<client::Client, String> {
    let web_cert = match &args.web_config_file {
        Some(f) => client::web_config_certificate(f)?,
        None => None,
    };
    let scheme = if web_cert.is_some() { "https" } else { "http" };
    // The agent's listen address, as a client reaches it (all addresses: this host's).
    let local = match listen.ip() {
        ip if ip.is_unspecified() => format!("127.0.0.1:{}", listen.port()),
        _ => listen.to_string(),
    };
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}"));
    let ca = args.ca_file.clone().or(web_cert);
    let https = url.starts_with("https://");
    let credentials = match &args.user {
        None => None,
        Some(user) => Some((user.clone(), password(args)?)),
    };
    client::Client::new(&url, ca.as_deref().filter(|_| https), credentials)
}

fn password(args: &TopArgs) -> Result<String, String> {
    if let Some(file) = &args.password_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("--password-file {}: {e}", file.display()))?;
        return Ok(text.lines().next().unwrap_or("").to_owned());
    }
    std::env::var("LLMSCOPE_TOP_PASSWORD")
        .map_err(|_| "--user needs a password: LLMSCOPE_TOP_PASSWORD or --password-file".to_owned())
}

/// What the screen shows now.
struct Screen {
    url: String,
    options: Options,
    /// The filter being typed (`/` … Enter).
    editing: Option<String>,
    help: bool,
    /// The last two readings (rates are taken between them) and when they were taken.
    now: Option<(Node, Instant)>,
    before: Option<(Node, Instant)>,
    error: Option<String>,
}

impl Screen {
    fn reading(&mut self, reading: Result<Node, String>, at: Instant) {
        match reading {
            Ok(node) => {
                self.before = self.now.take();
                self.now = Some((node, at));
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }

    /// Handles a key; false to quit.
    fn key(&mut self, key: KeyEvent) -> bool {
        if key.kind != KeyEventKind::Press {
            return true;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return false;
        }
        if let Some(text) = &mut self.editing {
            match key.code {
                KeyCode::Enter => self.options.filter = self.editing.take().unwrap_or_default(),
                KeyCode::Esc => self.editing = None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) if text.len() < 64 => text.push(c),
                _ => {}
            }
            return true;
        }
        match key.code {
            KeyCode::Char('q') => return false,
            KeyCode::Char('s') => self.options.sort = self.options.sort.next(),
            KeyCode::Char('r') => self.options.reverse = !self.options.reverse,
            KeyCode::Char('/') => self.editing = Some(String::new()),
            KeyCode::Char('?' | 'h') => self.help = !self.help,
            KeyCode::Esc => {
                self.options.filter.clear();
                self.help = false;
            }
            _ => {}
        }
        true
    }

    fn lines(&self, width: usize, height: usize) -> Vec<Line<'static>> {
        let bold = Style::default().add_modifier(Modifier::BOLD);
        let mut out = Vec::new();
        let title = match &self.now {
            // What the keys change first: a narrow terminal cuts the end.
            Some((node, _)) => format!(
                "llmscope top  sort {}{}{}  {} processes  {}  agent {} ({})",
                self.options.sort.as_str(),
                if self.options.reverse { " ↑" } else { "" },
                if self.options.filter.is_empty() {
                    String::new()
                } else {
                    format!("  filter \"{}\"", self.options.filter)
                },
                node.processes.iter().filter(|p| p.alive).count(),
                self.url,
                node.agent.version,
                node.agent.mode,
            ),
            None => format!("llmscope top  {}  waiting for the agent…", self.url),
        };
        out.push(Line::styled(title, bold));
        if let Some(e) = &self.error {
            out.push(Line::styled(
                format!("cannot read the agent: {e}"),
                Style::default().add_modifier(Modifier::REVERSED),
            ));
        }
        if self.help {
            for h in HELP {
                out.push(Line::raw(*h));
            }
        } else if let Some((node, at)) = &self.now {
            out.extend(view::gpu_lines(node).into_iter().map(Line::raw));
            let before = self
                .before
                .as_ref()
                .map(|(n, t)| (n, at.duration_since(*t).as_secs_f64()));
            let rows = view::rows(node, before, &self.options);
            let (header, lines) = view::table(&rows, Some(width));
            out.push(Line::styled(
                format!("{header:<width$}"),
                Style::default().add_modifier(Modifier::REVERSED),
            ));
            // Rows fill what the header lines and the key line leave.
            let room = height.saturating_sub(out.len() + 1);
            for (row, text) in rows.iter().zip(lines).take(room) {
                let style = if row.process.alive {
                    Style::default()
                } else {
                    Style::default().add_modifier(Modifier::DIM)
                };
                out.push(Line::styled(text, style));
            }
        }
        while out.len() + 1 < height {
            out.push(Line::raw(""));
        }
        let keys = match &self.editing {
            Some(text) => format!("filter: {text}_   Enter apply  Esc cancel"),
            None => "q quit  s sort  r reverse  / filter  Esc clear  ? help".to_owned(),
        };
        out.push(Line::from(Span::styled(keys, bold)));
        out
    }
}

const HELP: &[&str] = &[
    "",
    "  q, Ctrl-C  quit",
    "  s          next sort key: cpu, memory, gpu, launches, requests, pid, model",
    "  r          reverse the order",
    "  /          filter: rows whose pid, name, framework, model, role, container or pod",
    "             contain the text (their servers stay above them); Enter applies it",
    "  Esc        clear the filter",
    "  ?          this help",
    "",
    "  GPUMEM: NVML's figure for the process; CUDAMEM: live allocations the CUDA probes saw;",
    "  LNCH/s, COPY/s: kernel launches and bytes copied a second; SYNC%: time in CUDA",
    "  synchronize calls; REQ/s and LAT: requests a second and their mean duration (request",
    "  telemetry); rates are taken between the last two readings.",
];

fn live(client: client::Client, interval: Duration, options: Options) -> Result<(), String> {
    let (readings, received) = mpsc::sync_channel::<(Result<Node, String>, Instant)>(1);
    let url = client.url.clone();
    // Readings on a thread of their own: a slow agent never freezes the keys.
    std::thread::Builder::new()
        .name("llmscope-top-fetch".into())
        .spawn(move || loop {
            let started = Instant::now();
            let reading = client.fetch();
            if readings.send((reading, Instant::now())).is_err() {
                return;
            }
            std::thread::sleep(interval.saturating_sub(started.elapsed()));
        })
        .map_err(|e| format!("cannot start the reading thread: {e}"))?;
    let mut terminal = ratatui::init();
    let mut screen = Screen {
        url,
        options,
        editing: None,
        help: false,
        now: None,
        before: None,
        error: None,
    };
    let result = (|| -> std::io::Result<()> {
        loop {
            terminal.draw(|frame| {
                let area = frame.area();
                let lines = screen.lines(usize::from(area.width), usize::from(area.height));
                frame.render_widget(Paragraph::new(lines), area);
            })?;
            // Wait for a key, a resize or the next reading, whichever comes first.
            let deadline = Instant::now() + Duration::from_millis(100);
            if event::poll(deadline.saturating_duration_since(Instant::now()))? {
                match event::read()? {
                    Event::Key(key) if !screen.key(key) => return Ok(()),
                    _ => {}
                }
            }
            while let Ok((reading, at)) = received.try_recv() {
                screen.reading(reading, at);
            }
        }
    })();
    ratatui::restore();
    result.map_err(|e| format!("terminal: {e}"))
}
