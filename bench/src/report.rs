//! The benchmark's output: one [`Figure`] per named figure (a number, or `null` with the reason), its
//! goal and whether the goal is met, the machine it ran on, and each phase's raw measurements. Printed
//! as a table and written as JSON.

use std::time::Duration;

use serde_json::{json, Map, Value};

/// A goal a figure is checked against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
    /// No goal: a figure shown for context (its `met` is null).
    Context,
}

impl Goal {
    pub fn met(self, v: f64) -> bool {
        match self {
            Goal::AtLeast(g) => v >= g,
            Goal::AtMost(g) => v <= g,
            Goal::Context => true,
        }
    }

    pub fn text(self) -> String {
        match self {
            Goal::AtLeast(g) => format!(">= {g}"),
            Goal::AtMost(g) => format!("<= {g}"),
            Goal::Context => "(context)".into(),
        }
    }
}

/// One named figure of the report.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: &'static str,
    pub value: Option<f64>,
    pub unit: &'static str,
    pub goal: Goal,
    /// What A and B were, and the raw numbers behind a ratio.
    pub detail: String,
    /// Why the value is missing, or what limits it when the goal is not met.
    pub note: Option<String>,
}

impl Figure {
    pub fn new(name: &'static str, unit: &'static str, goal: Goal) -> Figure {
        Figure {
            name,
            value: None,
            unit,
            goal,
            detail: String::new(),
            note: None,
        }
    }

    pub fn value(mut self, v: f64) -> Figure {
        self.value = v.is_finite().then_some(v);
        self
    }

    pub fn detail(mut self, d: impl Into<String>) -> Figure {
        self.detail = d.into();
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Figure {
        self.note = Some(n.into());
        self
    }

    /// A figure that could not be measured.
    pub fn missing(name: &'static str, unit: &'static str, goal: Goal, why: String) -> Figure {
        Figure::new(name, unit, goal).note(why)
    }

    pub fn met(&self) -> Option<bool> {
        if self.goal == Goal::Context {
            return None;
        }
        self.value.map(|v| self.goal.met(v))
    }
}

/// A phase's outcome: its figures and its raw measurements.
#[derive(Debug, Clone, Default)]
pub struct PhaseOutput {
    pub figures: Vec<Figure>,
    pub details: Map<String, Value>,
}

impl PhaseOutput {
    pub fn fig(&mut self, f: Figure) {
        self.figures.push(f);
    }

    pub fn set(&mut self, key: &str, v: Value) {
        self.details.insert(key.to_string(), v);
    }
}

/// The machine the benchmark ran on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub cpu_model: String,
    pub mem_total_kb: u64,
    pub versions: Vec<(String, String)>,
    pub git: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|r| r.split_once(':'))
            .map_or_else(|| "unknown".to_string(), |(_, v)| v.trim().to_string());
        let mem_total_kb = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let first_line = |prog: &str, args: &[&str]| -> String {
            std::process::Command::new(prog)
                .args(args)
                .output()
                .ok()
                .map(|o| {
                    let text = if o.stdout.is_empty() {
                        o.stderr
                    } else {
                        o.stdout
                    };
                    String::from_utf8_lossy(&text)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string()
                })
                .unwrap_or_else(|| "not found".into())
        };
        let nginx = farm_tests::nginx::nginx_bin();
        let versions = vec![
            (
                "redis-server".to_string(),
                first_line("redis-server", &["--version"]),
            ),
            (
                "nginx".to_string(),
                first_line(&nginx.to_string_lossy(), &["-v"]),
            ),
            ("ffmpeg".to_string(), first_line("ffmpeg", &["-version"])),
        ];
        let root = farm_tests::nginx::repo_root();
        let git = first_line(
            "git",
            &[
                "-C",
                &root.to_string_lossy(),
                "describe",
                "--always",
                "--dirty",
            ],
        );
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            cpu_model,
            mem_total_kb,
            versions,
            git,
        }
    }

    pub fn json(&self) -> Value {
        let versions: Map<String, Value> = self
            .versions
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json!({
            "cores": self.cores,
            "kernel": self.kernel,
            "cpu_model": self.cpu_model,
            "mem_total_kb": self.mem_total_kb,
            "versions": versions,
            "git": self.git,
        })
    }
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Report {
    pub mode: &'static str,
    pub command: String,
    pub machine: Machine,
    pub started_unix: u64,
    pub elapsed: Duration,
    pub phases: Vec<PhaseRun>,
}

/// One phase's outcome.
#[derive(Debug, Clone)]
pub struct PhaseRun {
    pub name: &'static str,
    /// Its output, or the error that stopped it.
    pub result: Result<PhaseOutput, String>,
    pub took: Duration,
    /// Share of all cores busy during the second before it started, when nothing of the benchmark
    /// ran: other work on the machine, which makes figures noisy.
    pub busy_before_pct: Option<f64>,
}

/// `(busy, total)` jiffies of all cores from `/proc/stat` (busy: everything but idle and iowait).
pub fn cpu_jiffies() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

impl Report {
    /// Every figure, in phase order.
    pub fn figures(&self) -> Vec<&Figure> {
        self.phases
            .iter()
            .filter_map(|p| p.result.as_ref().ok())
            .flat_map(|p| p.figures.iter())
            .collect()
    }

    pub fn failed_phases(&self) -> Vec<(&'static str, &str)> {
        self.phases
            .iter()
            .filter_map(|p| p.result.as_ref().err().map(|e| (p.name, e.as_str())))
            .collect()
    }

    /// Phases that started while other work kept more than 20 % of the machine busy, as
    /// `(phase, busy %)`.
    pub fn busy_starts(&self) -> Vec<(&'static str, f64)> {
        self.phases
            .iter()
            .filter_map(|p| p.busy_before_pct.filter(|b| *b > 20.0).map(|b| (p.name, b)))
            .collect()
    }

    pub fn json(&self) -> Value {
        let mut figures = Map::new();
        let mut goals = Map::new();
        let mut list = Vec::new();
        for f in self.figures() {
            figures.insert(
                f.name.to_string(),
                f.value.map_or(Value::Null, |v| json!(round(v))),
            );
            goals.insert(f.name.to_string(), Value::String(f.goal.text()));
            list.push(json!({
                "name": f.name,
                "value": f.value.map(round),
                "unit": f.unit,
                "goal": f.goal.text(),
                "met": f.met(),
                "detail": f.detail,
                "note": f.note,
            }));
        }
        let mut phases = Map::new();
        for p in &self.phases {
            let secs = round(p.took.as_secs_f64());
            let v = match &p.result {
                Ok(out) => json!({
                    "ok": true,
                    "seconds": secs,
                    "machine_busy_pct_before": p.busy_before_pct,
                    "details": Value::Object(out.details.clone()),
                }),
                Err(e) => json!({
                    "ok": false,
                    "seconds": secs,
                    "machine_busy_pct_before": p.busy_before_pct,
                    "error": e,
                }),
            };
            phases.insert(p.name.to_string(), v);
        }
        json!({
            "tool": "farm-bench",
            "mode": self.mode,
            "command": self.command,
            "started_unix": self.started_unix,
            "seconds": round(self.elapsed.as_secs_f64()),
            "machine": self.machine.json(),
            "figures": figures,
            "goals": goals,
            "figure_list": list,
            "phases": phases,
        })
    }

    /// The table printed to stdout (and pasted into the README): Markdown, one row per figure.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("| figure | value | goal | met | A vs B (anchor), raw numbers |\n");
        out.push_str("|---|---|---|---|---|\n");
        for f in self.figures() {
            let value = f.value.map_or_else(
                || "null".to_string(),
                |v| format!("{}{}", num(v), unit_suffix(f.unit)),
            );
            let met = match f.met() {
                Some(true) => "yes".to_string(),
                Some(false) => "**no**".to_string(),
                None => "n/a".to_string(),
            };
            let mut detail = f.detail.clone();
            if let Some(n) = &f.note {
                if !detail.is_empty() {
                    detail.push_str(". ");
                }
                detail.push_str(n);
            }
            out.push_str(&format!(
                "| `{}` | {} | {} | {} | {} |\n",
                f.name,
                value,
                f.goal.text(),
                met,
                detail.replace('|', "/")
            ));
        }
        for (name, err) in self.failed_phases() {
            out.push_str(&format!(
                "| phase `{name}` | failed | | | {} |\n",
                err.replace('|', "/").replace('\n', " ")
            ));
        }
        out
    }

    /// About the machine and the run (and a warning when other work was running).
    pub fn header(&self) -> String {
        let busy = self.busy_starts();
        let warning = if busy.is_empty() {
            String::new()
        } else {
            format!(
                "\nwarning: other work was running on the machine ({}): figures are noisier than on a quiet machine",
                busy.iter()
                    .map(|(n, b)| format!("{b:.0}% of the cores busy before {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        format!(
            "farm-bench {} mode, {:.0} s; {} cores ({}), kernel {}, {} MB RAM; {}; source {}",
            self.mode,
            self.elapsed.as_secs_f64(),
            self.machine.cores,
            self.machine.cpu_model,
            self.machine.kernel,
            self.machine.mem_total_kb / 1024,
            self.machine
                .versions
                .iter()
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            self.machine.git
        ) + &warning
    }
}

fn unit_suffix(unit: &str) -> String {
    match unit {
        "" | "ratio" => String::new(),
        "%" => "%".into(),
        u => format!(" {u}"),
    }
}

/// A number with a sensible number of digits for the table.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Rounds to 4 significant decimals for the JSON (raw timings are noisy beyond that).
pub fn round(v: f64) -> f64 {
    if !v.is_finite() || v == 0.0 {
        return v;
    }
    let digits = 4 - (v.abs().log10().floor() as i32) - 1;
    let f = 10f64.powi(digits.clamp(0, 9));
    (v * f).round() / f
}

/// Nearest-rank percentile (`p` in 0..=100) of `xs`; `None` when empty.
pub fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let xs = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&xs, 50.0), Some(3.0));
        assert_eq!(percentile(&xs, 99.0), Some(5.0));
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn goals_and_rounding() {
        assert!(Goal::AtLeast(1.0).met(1.0));
        assert!(!Goal::AtMost(5.0).met(5.01));
        assert_eq!(Goal::AtMost(0.05).text(), "<= 0.05");
        assert_eq!(Goal::AtLeast(1.0).text(), ">= 1");
        assert_eq!(round(1234.5678), 1235.0);
        assert_eq!(round(0.012346), 0.01235);
        assert_eq!(num(0.5), "0.500");
        assert_eq!(num(0.998), "0.998");
        assert_eq!(num(1.5), "1.50");
        let f = Figure::new("x", "ms", Goal::AtMost(1.0)).value(f64::NAN);
        assert_eq!(f.value, None);
    }
}
