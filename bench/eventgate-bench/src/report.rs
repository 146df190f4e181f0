//! The result of a run: named figures, printed as a human table and as one
//! JSON line (`--json`), whose keys `bench/report.py` reads. Owns the output
//! format; must not measure.

use crate::latency::Latencies;
use crate::{Mode, Opts};
use serde_json::{json, Value};
use std::fmt::Write as _;

/// The figures of one run, in the order they were put.
pub(crate) struct Report {
    /// Key and human-readable value.
    rows: Vec<(String, String)>,
    /// Key and JSON value.
    json: serde_json::Map<String, Value>,
}

impl Report {
    /// An empty report.
    pub(crate) fn new() -> Report {
        Report {
            rows: Vec::new(),
            json: serde_json::Map::new(),
        }
    }

    /// A figure with its JSON value and its human text.
    pub(crate) fn put(&mut self, key: &str, v: Value, human: impl Into<String>) {
        self.rows.push((key.to_string(), human.into()));
        self.json.insert(key.to_string(), v);
    }

    /// A number rounded to `decimals` (0 when not finite).
    pub(crate) fn num(&mut self, key: &str, v: f64, decimals: usize) {
        let v = if v.is_finite() { v } else { 0.0 };
        self.put(
            key,
            json!((v * 10f64.powi(decimals as i32)).round() / 10f64.powi(decimals as i32)),
            format!("{v:.decimals$}"),
        );
    }

    /// A count.
    pub(crate) fn int(&mut self, key: &str, v: u64) {
        self.put(key, json!(v), v.to_string());
    }

    /// A number, or null when unknown.
    pub(crate) fn opt_num(&mut self, key: &str, v: Option<f64>, decimals: usize) {
        match v {
            Some(v) => self.num(key, v, decimals),
            None => self.put(key, Value::Null, "-"),
        }
    }

    /// A text.
    pub(crate) fn text(&mut self, key: &str, v: &str) {
        self.put(key, json!(v), v);
    }

    /// Prints the table (stdout, or stderr with the JSON line on stdout).
    pub(crate) fn emit(&self, as_json: bool) {
        let w = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut table = String::new();
        for (k, v) in &self.rows {
            let _ = writeln!(table, "  {k:<w$}  {v}");
        }
        if as_json {
            eprint!("{table}");
            println!("{}", Value::Object(self.json.clone()));
        } else {
            print!("{table}");
        }
    }
}

/// The figures every run starts with: mode, target, label, URL.
pub(crate) fn header(r: &mut Report, opts: &Opts, mode: Mode) {
    r.text("mode", mode.name());
    r.text("target", opts.target.name());
    if let Some(l) = &opts.label {
        r.text("label", l);
    }
    r.text("url", &opts.url);
}

/// Percentiles, max and mean of publish → receipt latency, in ms.
pub(crate) fn latency_rows(r: &mut Report, h: &Latencies) {
    let ms = |v: u64| v as f64 / 1000.0;
    r.num("latency_p50_ms", ms(h.quantile(0.50)), 3);
    r.num("latency_p90_ms", ms(h.quantile(0.90)), 3);
    r.num("latency_p99_ms", ms(h.quantile(0.99)), 3);
    r.num("latency_p999_ms", ms(h.quantile(0.999)), 3);
    r.num("latency_max_ms", ms(h.max()), 3);
    r.num("latency_mean_ms", h.mean() / 1000.0, 3);
}
