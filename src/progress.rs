//! Progress of `run` and `coordinator`: indicatif bars on a terminal (one for
//! the merge, one line per worker on the coordinator), plain log lines every
//! few seconds otherwise, nothing with `--quiet`.

use fleetmerge_engine::exec::human_bytes;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Seconds between log lines when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The state shown.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub units_total: usize,
    pub units_done: usize,
    pub units_running: usize,
    pub units_failed: usize,
    /// Input bytes accounted for (read, or in units an earlier run finished).
    pub input_done: u64,
    pub input_total: u64,
    pub written: u64,
    pub workers: Vec<Worker>,
}

pub use fleetmerge_coordinator::WorkerSnapshot as Worker;

impl From<&fleetmerge_coordinator::Snapshot> for State {
    fn from(s: &fleetmerge_coordinator::Snapshot) -> State {
        State {
            units_total: s.counts.total,
            units_done: s.counts.done,
            units_running: s.counts.running,
            units_failed: s.counts.failed,
            input_done: s.input_done,
            input_total: s.input_total,
            written: s.counts.bytes_written,
            workers: s.workers.clone(),
        }
    }
}

enum Mode {
    Off,
    Log {
        last: Option<Instant>,
    },
    Bars {
        multi: MultiProgress,
        main: ProgressBar,
        workers: BTreeMap<String, ProgressBar>,
    },
}

pub struct Display {
    mode: Mode,
    started: Instant,
    /// Input bytes done when the display started (resumed work), and per-worker
    /// (bytes read, when) samples for throughput.
    baseline: Option<u64>,
    samples: BTreeMap<String, (u64, Instant, f64)>,
}

impl Display {
    /// Bars when stderr is a terminal, log lines otherwise, nothing when quiet.
    pub fn new(quiet: bool) -> Display {
        let mode = if quiet {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
            let main = multi.add(ProgressBar::new(1));
            main.set_style(
                ProgressStyle::with_template(
                    "{spinner:.green} [{elapsed_precise}] [{bar:30.cyan/blue}] {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            main.enable_steady_tick(Duration::from_millis(200));
            Mode::Bars {
                multi,
                main,
                workers: BTreeMap::new(),
            }
        } else {
            Mode::Log { last: None }
        };
        Display {
            mode,
            started: Instant::now(),
            baseline: None,
            samples: BTreeMap::new(),
        }
    }

    /// The one-line summary: units, bytes, throughput, ETA.
    fn line(&mut self, s: &State) -> String {
        let base = *self.baseline.get_or_insert(s.input_done);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = s.input_done.saturating_sub(base) as f64 / secs;
        let left = s.input_total.saturating_sub(s.input_done);
        let eta = if left == 0 {
            "done".to_string()
        } else if rate > 0.0 {
            format!("ETA {}", duration(left as f64 / rate))
        } else {
            "ETA -".to_string()
        };
        let mut units = format!("{}/{} units", s.units_done, s.units_total);
        if s.units_running > 0 {
            units.push_str(&format!(", {} running", s.units_running));
        }
        if s.units_failed > 0 {
            units.push_str(&format!(", {} FAILED", s.units_failed));
        }
        format!(
            "{units} · read {} of {} ({}/s) · written {} · {eta}",
            human_bytes(s.input_done as f64),
            human_bytes(s.input_total as f64),
            human_bytes(rate),
            human_bytes(s.written as f64),
        )
    }

    fn worker_line(&mut self, w: &Worker) -> String {
        let now = Instant::now();
        let (bytes, at, rate) =
            self.samples
                .entry(w.id.clone())
                .or_insert((w.bytes_read, now, 0.0));
        let dt = now.duration_since(*at).as_secs_f64();
        if dt >= 1.0 {
            *rate = w.bytes_read.saturating_sub(*bytes) as f64 / dt;
            *bytes = w.bytes_read;
            *at = now;
        }
        let units = match w.units.as_slice() {
            [] => "idle".to_string(),
            [u] => format!("unit {u}"),
            us => format!(
                "units {}",
                us.iter()
                    .map(|u| u.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!(
            "  {} ({}): {units} · {}/s · read {} · heartbeat {:.1} s ago",
            w.id,
            w.device,
            human_bytes(*rate),
            human_bytes(w.bytes_read as f64),
            w.last_seen_ms_ago as f64 / 1e3
        )
    }

    pub fn update(&mut self, s: &State) {
        if matches!(self.mode, Mode::Off) {
            return;
        }
        let line = self.line(s);
        let worker_lines: Vec<(String, String)> = s
            .workers
            .iter()
            .map(|w| (w.id.clone(), self.worker_line(w)))
            .collect();
        match &mut self.mode {
            Mode::Off => {}
            Mode::Log { last } => {
                if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    *last = Some(Instant::now());
                    log(s, &line);
                    for (_, l) in &worker_lines {
                        tracing::info!("progress: {}", l.trim_start());
                    }
                }
            }
            Mode::Bars {
                multi,
                main,
                workers,
            } => {
                main.set_length(s.input_total.max(1));
                main.set_position(s.input_done.min(s.input_total));
                main.set_message(line);
                for (id, l) in worker_lines {
                    let bar = workers.entry(id).or_insert_with(|| {
                        let b = multi.add(ProgressBar::new(1));
                        b.set_style(
                            ProgressStyle::with_template("{msg}")
                                .unwrap_or_else(|_| ProgressStyle::default_bar()),
                        );
                        b
                    });
                    bar.set_message(l);
                }
            }
        }
    }

    /// The final state: bars finished in place, or a last log line.
    pub fn finish(&mut self, s: &State) {
        self.update(s);
        match &self.mode {
            Mode::Off => {}
            Mode::Log { .. } => {
                let line = self.line(s);
                log(s, &line);
            }
            Mode::Bars { main, workers, .. } => {
                for b in workers.values() {
                    b.finish();
                }
                main.finish();
            }
        }
    }
}

/// Logs are JSON (`--log-format json`): progress lines carry their numbers as fields.
pub static STRUCTURED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A progress log line (with the numbers as fields for log collectors).
fn log(s: &State, line: &str) {
    if !STRUCTURED.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::info!("progress: {line}");
        return;
    }
    tracing::info!(
        units_done = s.units_done,
        units_total = s.units_total,
        bytes_read = s.input_done,
        bytes_to_read = s.input_total,
        bytes_written = s.written,
        "progress: {line}"
    );
}

fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}
