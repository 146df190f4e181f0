//! What the soak shows: a sample every second (each node's RSS and open
//! files, connected clients, WebSocket deliveries/s and their p99, webhook
//! requests/s, 5xx so far) written as `timeseries.csv`, and at the end
//! `summary.json`, a one-page `summary.md` with the verdict and what each
//! fault did, and `plot.png` (drawn by `bench/soak_plot.py` when Python's
//! matplotlib is there). The run fails when a check fails.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;

use super::{Inst, Soak};
use crate::system::proc_rss_kib;
use crate::BoxResult;

/// One second of the run.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) pids: Vec<Option<u32>>,
    pub(crate) rss_kib: Vec<Option<u64>>,
    pub(crate) fds: Vec<Option<u64>>,
    pub(crate) connected: u64,
    pub(crate) ws_per_sec: u64,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) webhook_per_sec: u64,
    pub(crate) http_5xx: u64,
}

static SAMPLES: Mutex<Vec<Sample>> = Mutex::new(Vec::new());

/// Samples once a second until aborted.
pub(crate) async fn sample_loop(soak: Arc<Soak>) {
    let mut last_ws = 0;
    let mut last_hooks = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let t = soak.now();
        let pids = soak.cluster.pids();
        let mut connected = 0;
        for i in 0..soak.cluster.len() {
            connected += connected_clients(&soak, i).await;
        }
        let ws = soak.ledger.delivered_total();
        let hooks = soak.receivers.requests();
        let sample = Sample {
            t,
            rss_kib: pids
                .iter()
                .map(|p| p.and_then(|p| proc_rss_kib(&p.to_string()).ok()))
                .collect(),
            fds: pids.iter().map(|p| p.and_then(open_fds)).collect(),
            pids,
            connected,
            ws_per_sec: ws - last_ws,
            p99_ms: soak.ledger.p99_of((t as u64).saturating_sub(1)),
            webhook_per_sec: hooks - last_hooks,
            http_5xx: soak.ledger.count_5xx(),
        };
        last_ws = ws;
        last_hooks = hooks;
        SAMPLES.lock().push(sample);
    }
}

/// The node's connected clients (0 while it does not answer; a node that
/// is not ready, say with NATS away, still counts its clients).
async fn connected_clients(soak: &Soak, node: usize) -> u64 {
    match soak.cluster.api(node).metrics().await {
        Ok(text) => crate::target::connected_clients(&text).unwrap_or(0),
        Err(_) => 0,
    }
}

fn open_fds(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// Growth of one node's figure from after its warm-up to the end of the
/// run, over the samples since its last restart: (reference, end).
fn growth(
    samples: &[Sample],
    node: usize,
    warm: f64,
    figure: impl Fn(&Sample) -> Option<u64>,
) -> Option<(u64, u64)> {
    let last_pid = samples.last()?.pids.get(node).copied().flatten()?;
    let since: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.pids.get(node).copied().flatten() == Some(last_pid))
        .collect();
    let start = since.first()?.t;
    let reference = since
        .iter()
        .find(|s| s.t >= start + warm)
        .and_then(|s| figure(s))?;
    let mut tail: Vec<u64> = since
        .iter()
        .rev()
        .take(5)
        .filter_map(|s| figure(s))
        .collect();
    tail.sort_unstable();
    let end = *tail.get(tail.len() / 2)?;
    Some((reference, end))
}

/// Writes the report; `Err` lists the failed checks.
pub(crate) fn write(soak: &Soak, _instances: &[Inst]) -> BoxResult<()> {
    let samples = SAMPLES.lock().clone();
    let total = soak.args.minutes * 60.0;
    // Growth is judged over the traffic, not the quiet settling after it.
    let traffic: Vec<Sample> = samples.iter().filter(|s| s.t <= total).cloned().collect();
    let verdict = soak.ledger.verdict(&soak.receivers);
    let warm = (total * 0.2).min(300.0);
    let mut failures = verdict.failures();
    let mut growth_rows = Vec::new();
    for node in 0..soak.cluster.len() {
        for (name, ratio, gate) in [("open files", 1.1, true), ("RSS KiB", 1.1, total >= 600.0)] {
            let figure = |s: &Sample| -> Option<u64> {
                if name == "open files" {
                    s.fds.get(node).copied().flatten()
                } else {
                    s.rss_kib.get(node).copied().flatten()
                }
            };
            if let Some((reference, end)) = growth(&traffic, node, warm, figure) {
                let limit =
                    reference as f64 * ratio + if name == "open files" { 16.0 } else { 0.0 };
                let ok = (end as f64) <= limit;
                growth_rows.push(format!(
                    "| node {node} | {name} | {reference} | {end} | {:.2} | {} |",
                    end as f64 / reference.max(1) as f64,
                    if ok {
                        "ok"
                    } else if gate {
                        "FAIL"
                    } else {
                        "over (not gated in short runs)"
                    }
                ));
                if !ok && gate {
                    failures.push(format!(
                        "node {node}: {name} grew from {reference} to {end}"
                    ));
                }
            }
        }
    }
    let window = warm.max(1.0) as u64;
    let first = soak.ledger.p99_between(1, window);
    let last = soak
        .ledger
        .p99_between((total as u64).saturating_sub(window), total as u64 + 1);
    let p99_ratio = match (first, last) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    };
    if total >= 600.0 && p99_ratio.is_some_and(|r| r > 1.2) {
        failures.push(format!(
            "p99 of the last {window} s is {:.2}× the first's",
            p99_ratio.unwrap_or(0.0)
        ));
    }
    let out = &soak.args.out;
    let mut csv = String::from(
        "t,node,pid,rss_kib,fds,connected,ws_per_sec,p99_ms,webhook_per_sec,http_5xx\n",
    );
    for s in &samples {
        for node in 0..s.pids.len() {
            let _ = writeln!(
                csv,
                "{:.1},{node},{},{},{},{},{},{},{},{}",
                s.t,
                s.pids[node].map(|p| p.to_string()).unwrap_or_default(),
                s.rss_kib
                    .get(node)
                    .copied()
                    .flatten()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                s.fds
                    .get(node)
                    .copied()
                    .flatten()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                s.connected,
                s.ws_per_sec,
                s.p99_ms.map(|v| format!("{v:.2}")).unwrap_or_default(),
                s.webhook_per_sec,
                s.http_5xx
            );
        }
    }
    write_file(&out.join("timeseries.csv"), &csv)?;
    let summary = json!({
        "minutes": soak.args.minutes,
        "nodes": soak.args.nodes,
        "clients": soak.args.soak_clients,
        "instances": soak.args.soak_instances,
        "rate": soak.args.soak_rate,
        "churn_per_sec": soak.args.churn,
        "verdict": verdict,
        "p99_first_ms": first,
        "p99_last_ms": last,
        "p99_ratio": p99_ratio,
        "growth": growth_rows,
        "failures": failures,
    });
    write_file(&out.join("summary.json"), &format!("{summary:#}\n"))?;
    let md = summary_md(soak, &verdict, &growth_rows, first, last, window, &failures);
    write_file(&out.join("summary.md"), &md)?;
    let plot = std::process::Command::new("python3")
        .arg("bench/soak_plot.py")
        .arg(out)
        .status();
    if !matches!(plot, Ok(s) if s.success()) {
        eprintln!("soak: no plot (bench/soak_plot.py needs python3 with matplotlib)");
    }
    print!("{md}");
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("soak failed: {}", failures.join("; ")))
    }
}

/// A section of `heading` listing `items`, one bullet each; nothing when
/// there are none.
fn bullets(md: &mut String, heading: &str, items: &[String]) {
    if items.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## {heading}\n");
    for item in items {
        let _ = writeln!(md, "- {item}");
    }
}

fn write_file(path: &std::path::Path, text: &str) -> BoxResult<()> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn summary_md(
    soak: &Soak,
    v: &super::ledger::Verdict,
    growth_rows: &[String],
    first: Option<f64>,
    last: Option<f64>,
    window: u64,
    failures: &[String],
) -> String {
    let a = &soak.args;
    let mut md = String::new();
    let _ = writeln!(md, "# Soak: {} node(s), {} minutes\n", a.nodes, a.minutes);
    let _ = writeln!(
        md,
        "{} clients over {} instances (churn {}/s, a third of reconnects recovering), {} events/s with bursts of 1000, \
settings changed every 3 s, an instance created and deleted every 15 s, webhook receivers slow / failing / timing out.\n",
        a.soak_clients, a.soak_instances, a.churn, a.soak_rate
    );
    let _ = writeln!(
        md,
        "**Verdict: {}**\n",
        if failures.is_empty() {
            "passed".to_string()
        } else {
            format!("FAILED — {}", failures.join("; "))
        }
    );
    let _ = writeln!(md, "| figure | value |\n|---|---|");
    for (k, val) in [
        ("events acknowledged", v.events_acknowledged.to_string()),
        ("WebSocket sessions", v.ws_sessions.to_string()),
        (
            "WebSocket deliveries expected / made",
            format!("{} / {}", v.ws_expected, v.ws_delivered),
        ),
        (
            "lost outside fault windows",
            v.ws_lost_unexplained.to_string(),
        ),
        (
            "not delivered inside fault windows (allowed)",
            v.ws_lost_in_fault_windows.to_string(),
        ),
        (
            "duplicates / filter violations / media mismatches",
            format!(
                "{} / {} / {}",
                v.ws_duplicates, v.ws_filter_violations, v.ws_media_mismatches
            ),
        ),
        (
            "unexpected closes / closes in fault windows",
            format!(
                "{} / {}",
                v.ws_unexpected_closes, v.ws_closes_in_fault_windows
            ),
        ),
        (
            "recoveries true / false",
            format!("{} / {}", v.recoveries_true, v.recoveries_false),
        ),
        (
            "webhook deliveries expected / lost / duplicated",
            format!(
                "{} / {} / {}",
                v.webhook_expected, v.webhook_lost, v.webhook_duplicates
            ),
        ),
        (
            "dead letters requeued at the end",
            v.dead_letters_retried.to_string(),
        ),
        (
            "5xx outside / inside fault windows",
            format!(
                "{} / {}",
                v.http_5xx_outside_faults, v.http_5xx_in_fault_windows
            ),
        ),
        ("ephemeral instance rounds", v.ephemeral_rounds.to_string()),
        (
            "p99 of live deliveries (replays left out), first / last window",
            format!(
                "{} / {} ms ({window} s each)",
                first.map(|x| format!("{x:.2}")).unwrap_or("-".into()),
                last.map(|x| format!("{x:.2}")).unwrap_or("-".into())
            ),
        ),
    ] {
        let _ = writeln!(md, "| {k} | {val} |");
    }
    let _ = writeln!(md, "\n## Faults\n\n| fault | start s | end s | WebSocket events not delivered | closes | 5xx | failed requests |\n|---|---|---|---|---|---|---|");
    for f in &v.faults {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {} | {} | {} | {} |",
            f.fault,
            f.start_secs,
            f.end_secs,
            f.ws_events_not_delivered,
            f.ws_closes,
            f.http_5xx,
            f.http_errors
        );
    }
    let _ = writeln!(md, "\nWebhook deliveries must all arrive whatever the fault; WebSocket events may be missed inside a fault window (contract §6).\n");
    let _ = writeln!(md, "## Growth (after warm-up → end, since each node's last start)\n\n| node | figure | after warm-up | end | ratio | check |\n|---|---|---|---|---|---|");
    for row in growth_rows {
        let _ = writeln!(md, "{row}");
    }
    let listed = |what: &str, n: usize| format!("{what} (the first {n})");
    bullets(
        &mut md,
        &listed(
            "WebSocket misses outside fault windows, filter violations and media mismatches",
            v.ws_misses.len(),
        ),
        &v.ws_misses,
    );
    bullets(
        &mut md,
        &listed(
            "WebSocket events received twice",
            v.ws_duplicate_notes.len(),
        ),
        &v.ws_duplicate_notes,
    );
    bullets(
        &mut md,
        &format!(
            "Slowest seconds of live WebSocket delivery (over 1 s; the {} slowest, in time order)",
            v.slow_deliveries.len()
        ),
        &v.slow_deliveries,
    );
    bullets(&mut md, "Problems", &v.problems[..v.problems.len().min(30)]);
    md
}
