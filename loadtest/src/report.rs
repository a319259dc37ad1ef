//! The results table, and the same figures as JSON for the benchmark script.

use std::{io::Write, path::Path, time::Duration};

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use crate::subscriber::histogram;

/// One scenario's results.
pub struct Report {
    title: String,
    rows: Vec<(String, String)>,
    pub json: Map<String, Value>,
}

impl Report {
    pub fn new(title: impl Into<String>) -> Self {
        let title = title.into();
        let mut json = Map::new();
        json.insert("scenario".into(), json!(title));
        Self {
            title,
            rows: Vec::new(),
            json,
        }
    }

    pub fn row(&mut self, label: &str, value: impl Into<String>) {
        self.rows.push((label.to_owned(), value.into()));
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.json.insert(key.to_owned(), value.into());
    }

    /// Latency percentiles (microsecond values) as a row and as JSON `{key}_p50_ms` etc.
    pub fn latency(&mut self, label: &str, key: &str, pairs: &[(u64, u64)]) {
        let h = from_pairs(pairs);
        if h.is_empty() {
            self.row(label, "no samples");
            return;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        self.row(
            label,
            format!(
                "p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
                ms(0.5),
                ms(0.9),
                ms(0.99),
                h.max() as f64 / 1000.0
            ),
        );
        for (q, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
            self.set(&format!("{key}_{name}_ms"), round(ms(q)));
        }
        self.set(&format!("{key}_max_ms"), round(h.max() as f64 / 1000.0));
    }

    pub fn cpu(&mut self, label: &str, key: &str, cpu: Duration, per: u64, unit: &str) {
        let per_unit = if per == 0 {
            0.0
        } else {
            cpu.as_secs_f64() * 1e6 / per as f64
        };
        self.row(
            label,
            format!("{:.2} s ({per_unit:.2} µs per {unit})", cpu.as_secs_f64()),
        );
        self.set(&format!("{key}_cpu_s"), round(cpu.as_secs_f64()));
        self.set(&format!("{key}_cpu_us_per_{unit}"), round(per_unit));
    }

    pub fn print(&self) {
        println!("\n{}", self.title);
        let width = self
            .rows
            .iter()
            .map(|(l, _)| l.chars().count())
            .max()
            .unwrap_or(0);
        for (label, value) in &self.rows {
            println!("  {label:<width$}  {value}");
        }
    }

    /// Appends the JSON figures as one line to `path`.
    pub fn append_json(&self, path: &Path) -> anyhow::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(file, "{}", Value::Object(self.json.clone()))?;
        Ok(())
    }
}

pub fn from_pairs(pairs: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = histogram();
    for &(v, c) in pairs {
        let _ = h.record_n(v, c);
    }
    h
}

pub fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `12345678` → `12,345,678`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Markdown tables of JSON-lines figures, one table per kind of scenario, rows in run order.
pub fn markdown(lines: &str) -> anyhow::Result<String> {
    let runs: Vec<Value> = lines
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let text = |v: &Value, key: &str| match &v[key] {
        Value::Null => "–".to_owned(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() >= 1000.0 => thousands(f as u64),
            _ => n.to_string(),
        },
        other => other.to_string(),
    };
    let tables: [(&str, &[(&str, &str)]); 4] = [
        (
            "fanout",
            &[
                ("run", "label"),
                ("server", "target"),
                ("transport", "transport"),
                ("subscribers", "subscribers"),
                ("channels", "channels"),
                ("events/s", "rate"),
                ("delivered", "delivered"),
                ("expected", "expected"),
                ("lost", "lost"),
                ("dup", "duplicates"),
                ("out of order", "out_of_order"),
                ("deliveries/s", "deliveries_per_s"),
                ("p50 ms", "latency_p50_ms"),
                ("p99 ms", "latency_p99_ms"),
                ("max ms", "latency_max_ms"),
                ("server µs/delivery", "server_cpu_us_per_delivery"),
                ("generator CPU s", "generator_cpu_s"),
            ],
        ),
        (
            "idle",
            &[
                ("run", "label"),
                ("server", "target"),
                ("transport", "transport"),
                ("connections", "connections"),
                ("failed", "failed"),
                ("held", "held"),
                ("RSS before MiB", "rss_before_mib"),
                ("RSS after MiB", "rss_after_mib"),
                ("KiB per connection", "kib_per_connection"),
            ],
        ),
        (
            "publish",
            &[
                ("run", "label"),
                ("server", "target"),
                ("clients", "clients"),
                ("events per request", "batch"),
                ("events/s", "events_per_s"),
                ("errors", "errors"),
                ("p50 ms", "latency_p50_ms"),
                ("p99 ms", "latency_p99_ms"),
                ("server µs/event", "server_cpu_us_per_event"),
            ],
        ),
        (
            "resume",
            &[
                ("run", "label"),
                ("server", "target"),
                ("clients", "clients"),
                ("events behind", "behind"),
                ("caught up", "caught_up"),
                ("seconds", "seconds"),
                ("lost", "lost"),
                ("dup", "duplicates"),
                ("server µs/delivery", "server_cpu_us_per_delivery"),
            ],
        ),
    ];
    let mut out = String::new();
    for (kind, columns) in tables {
        let rows: Vec<&Value> = runs.iter().filter(|r| r["kind"] == kind).collect();
        if rows.is_empty() {
            continue;
        }
        out.push_str(&format!("\n#### {kind}\n\n|"));
        for (title, _) in columns {
            out.push_str(&format!(" {title} |"));
        }
        out.push_str("\n|");
        for _ in columns.iter() {
            out.push_str("---|");
        }
        out.push('\n');
        for row in rows {
            out.push('|');
            for (_, key) in columns.iter() {
                out.push_str(&format!(" {} |", text(row, key)));
            }
            out.push('\n');
        }
    }
    Ok(out)
}
