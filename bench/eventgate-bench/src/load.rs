//! A load run, shared by `fanout`, `latency` and `stalled`: create the
//! instances, connect the clients, publish for `--secs`, wait for what is in
//! flight, and account deliveries, loss, latency and CPU; and the `fanout` /
//! `latency` modes themselves. Owns the run's sequence and its figures; the
//! stalled client is `stalled`'s.

use crate::clients::{aggregate, spawn_clients, Aggregate};
use crate::coord;
use crate::publish::{publisher, setup_instances, PubShared};
use crate::report::{header, latency_rows, Report};
use crate::system::{check_fds, machine_busy_secs, proc_cpu_secs, Server};
use crate::target::Endpoint;
use crate::{BoxResult, Mode, Opts};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Shared by fanout, latency and stalled: connect, publish, drain, account.
pub(crate) struct LoadPlan {
    /// WebSocket clients.
    pub(crate) clients: usize,
    /// Instances they are spread over, round robin.
    pub(crate) instances: usize,
    /// Total publish rate, events/s; `None`: as fast as replies come.
    pub(crate) rate: Option<f64>,
}

/// Most deliveries a run keeps one by one for the per-event figures
/// (16 bytes each); runs expecting more report only the overall latency.
pub(crate) const TRACK_EVENTS_MAX: f64 = 5e6;

impl LoadPlan {
    /// Whether clients keep every arrival: at a fixed rate, when the
    /// expected deliveries fit [`TRACK_EVENTS_MAX`].
    fn tracks_events(&self, secs: f64) -> bool {
        let per_instance = (self.clients as f64 / self.instances.max(1) as f64).ceil();
        self.rate
            .is_some_and(|r| r * secs * per_instance <= TRACK_EVENTS_MAX)
    }
}

/// The figures of one load run.
pub(crate) struct LoadResult {
    /// What the clients saw.
    pub(crate) agg: Aggregate,
    /// Publishes acknowledged.
    pub(crate) published: u64,
    /// Publishes refused or failed.
    pub(crate) publish_errors: u64,
    /// The first of those errors.
    pub(crate) first_error: Option<String>,
    /// How long publishing took.
    pub(crate) publish_secs: f64,
    /// From the first publish to the last receipt.
    pub(crate) recv_window_secs: f64,
    /// Server CPU seconds while measuring.
    pub(crate) cpu_secs: Option<f64>,
    /// This tool's CPU seconds while measuring.
    pub(crate) bench_cpu_secs: Option<f64>,
    /// The machine's busy CPU seconds while measuring.
    pub(crate) machine_cpu_secs: Option<f64>,
    /// How long the measuring lasted (publishing and drain).
    pub(crate) measured_secs: f64,
    /// Server RSS (KiB) at the end of the drain, the clients still connected.
    pub(crate) rss_loaded_kib: Option<u64>,
    /// Clients connected.
    pub(crate) connected: usize,
    /// Why the others did not, counted.
    pub(crate) connect_errors: Vec<String>,
    /// How long connecting took.
    pub(crate) connect_secs: f64,
}

/// Hooks that let `stalled` run code while the load is running.
pub(crate) type DuringHook = Box<dyn FnOnce(Instant) -> tokio::task::JoinHandle<Value> + Send>;

/// Runs one load: `pre_publish` is started when publishing starts and its
/// value returned with the result.
pub(crate) async fn run_load(
    opts: &Opts,
    ep: &Arc<Endpoint>,
    srv: &Server,
    plan: &LoadPlan,
    pre_publish: Option<DuringHook>,
) -> BoxResult<(LoadResult, Option<Value>)> {
    setup_instances(ep, plan.instances).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let (handles, connected, connect_errors, connect_secs) = spawn_clients(
        opts,
        ep,
        plan.clients,
        plan.instances,
        &stop_rx,
        &received,
        plan.tracks_events(opts.secs),
    )
    .await?;
    if connected == 0 {
        let _ = stop_tx.send(true);
        return Err(format!(
            "no client could connect: {}",
            connect_errors.join("; ")
        ));
    }
    // Let the server finish registering the new subscribers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    received.store(0, Ordering::Relaxed);

    let sh = Arc::new(PubShared::new(ep.clone(), plan.instances, opts.event_bytes));
    let me = std::process::id().to_string();
    let Window {
        t0,
        cpu0,
        hook,
        publish_secs,
        published_ok,
    } = if opts.listen_only {
        listen(opts, plan, srv, &me).await?
    } else {
        publish(opts, plan, srv, &me, &sh, pre_publish).await?
    };
    let mut per_inst_clients = vec![0u64; plan.instances];
    for i in 0..plan.clients {
        per_inst_clients[i % plan.instances.max(1)] += 1;
    }
    // Early end of the drain once every expected delivery arrived (only
    // computable when every client connected).
    let expected_all: u64 = if connected == plan.clients {
        published_ok
            .iter()
            .zip(per_inst_clients.iter())
            .map(|(p, c)| p * c)
            .sum()
    } else {
        u64::MAX
    };
    let drain_until = Instant::now() + Duration::from_secs_f64(opts.drain_secs);
    while Instant::now() < drain_until {
        if received.load(Ordering::Relaxed) >= expected_all {
            tokio::time::sleep(Duration::from_millis(100)).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu1 = CpuSample::now(srv, &me);
    let rss_loaded_kib = srv.rss();
    let measured_secs = t0.elapsed().as_secs_f64();
    let hook_value = match hook {
        Some(h) => h.await.ok(),
        None => None,
    };
    let _ = stop_tx.send(true);
    let mut stats = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(s) => stats.push(s),
            Err(e) => return Err(format!("client task failed: {e}")),
        }
    }
    let agg = aggregate(&stats, &published_ok);
    let recv_window_secs = agg
        .last_recv
        .map(|l| l.saturating_duration_since(t0).as_secs_f64())
        .unwrap_or(publish_secs)
        .max(1e-3);
    let first_error = sh.first_error.lock().ok().and_then(|g| g.clone());
    Ok((
        LoadResult {
            published: published_ok.iter().sum(),
            publish_errors: sh.errors.load(Ordering::Relaxed),
            first_error,
            publish_secs,
            recv_window_secs,
            cpu_secs: CpuSample::spent(cpu0.server, cpu1.server),
            bench_cpu_secs: CpuSample::spent(cpu0.bench, cpu1.bench),
            machine_cpu_secs: CpuSample::spent(cpu0.machine, cpu1.machine),
            measured_secs,
            agg,
            rss_loaded_kib,
            connected,
            connect_errors,
            connect_secs,
        },
        hook_value,
    ))
}

/// CPU seconds so far.
struct CpuSample {
    server: Option<f64>,
    /// This tool's.
    bench: Option<f64>,
    /// The machine's busy ones.
    machine: Option<f64>,
}

impl CpuSample {
    fn now(srv: &Server, me: &str) -> CpuSample {
        CpuSample {
            server: srv.cpu(),
            bench: proc_cpu_secs(me, srv.tck).ok(),
            machine: machine_busy_secs(srv.tck),
        }
    }

    fn spent(from: Option<f64>, to: Option<f64>) -> Option<f64> {
        from.zip(to).map(|(a, b)| b - a)
    }
}

/// One process's publishing window: when it started, the CPU then, and
/// what was acknowledged.
struct Window {
    t0: Instant,
    cpu0: CpuSample,
    /// `stalled`'s code running alongside (the publishing process only).
    hook: Option<tokio::task::JoinHandle<Value>>,
    publish_secs: f64,
    /// Publishes acknowledged per instance.
    published_ok: Vec<u64>,
}

/// How long a process split over several (`coord`) waits for the others.
fn patience(opts: &Opts) -> Duration {
    Duration::from_secs_f64(opts.connect_timeout_secs + opts.secs + 60.0)
}

/// Publishes for `--secs` (after the `--listeners`, with `--coordinate`),
/// and tells them what was acknowledged.
async fn publish(
    opts: &Opts,
    plan: &LoadPlan,
    srv: &Server,
    me: &str,
    sh: &Arc<PubShared>,
    pre_publish: Option<DuringHook>,
) -> BoxResult<Window> {
    if let Some(dir) = &opts.coordinate {
        coord::wait_ready(dir, opts.listeners, patience(opts)).await?;
        coord::started(dir)?;
    }
    let pubs = opts.publishers.max(1);
    let interval = match plan.rate {
        Some(r) if r > 0.0 => Some(Duration::from_secs_f64(pubs as f64 / r)),
        _ => None,
    };
    let cpu0 = CpuSample::now(srv, me);
    let t0 = Instant::now();
    let hook = pre_publish.map(|h| h(t0));
    let until = t0 + Duration::from_secs_f64(opts.secs);
    let mut ph = Vec::new();
    for p in 0..pubs {
        let offset = interval
            .map(|iv| iv * p as u32 / pubs as u32)
            .unwrap_or_default();
        ph.push(tokio::spawn(publisher(
            p,
            sh.clone(),
            until,
            interval,
            offset,
        )));
    }
    for h in ph {
        let _ = h.await;
    }
    let publish_secs = t0.elapsed().as_secs_f64();
    let published_ok: Vec<u64> = sh.ok.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    if let Some(dir) = &opts.coordinate {
        let account = coord::Published {
            publish_secs,
            ok: published_ok.clone(),
        };
        coord::published(dir, &account)?;
    }
    Ok(Window {
        t0,
        cpu0,
        hook,
        publish_secs,
        published_ok,
    })
}

/// `--listen-only`: says its clients are ready, then follows the
/// publishing process's window.
async fn listen(opts: &Opts, plan: &LoadPlan, srv: &Server, me: &str) -> BoxResult<Window> {
    let dir = opts
        .coordinate
        .as_deref()
        .ok_or("--listen-only needs --coordinate DIR")?;
    coord::ready(dir)?;
    let t0 = coord::wait_started(dir, patience(opts)).await?;
    let cpu0 = CpuSample::now(srv, me);
    let account = coord::wait_published(dir, patience(opts)).await?;
    if account.ok.len() != plan.instances {
        return Err(format!(
            "the publisher published to {} instances, this process has --instances {}",
            account.ok.len(),
            plan.instances
        ));
    }
    Ok(Window {
        t0,
        cpu0,
        hook: None,
        publish_secs: account.publish_secs,
        published_ok: account.ok,
    })
}

/// The figures of a load run.
pub(crate) fn load_rows(r: &mut Report, opts: &Opts, plan: &LoadPlan, lr: &LoadResult) {
    r.int("clients", plan.clients as u64);
    r.int("instances", plan.instances as u64);
    r.int("publishers", opts.publishers.max(1) as u64);
    match plan.rate {
        Some(x) => r.num("rate_target", x, 1),
        None => r.put("rate_target", Value::Null, "max"),
    }
    r.int("event_bytes", opts.event_bytes as u64);
    r.num("secs", opts.secs, 1);
    r.int("threads", opts.threads.max(1) as u64);
    r.int("clients_connected", lr.connected as u64);
    r.num("connect_secs", lr.connect_secs, 2);
    if !lr.connect_errors.is_empty() {
        r.text("connect_errors", &lr.connect_errors.join("; "));
    }
    r.num("publish_secs", lr.publish_secs, 2);
    r.int("published", lr.published);
    r.num(
        "published_per_sec",
        lr.published as f64 / lr.publish_secs.max(1e-3),
        1,
    );
    r.int("publish_errors", lr.publish_errors);
    if let Some(e) = &lr.first_error {
        r.text("publish_first_error", e);
    }
    let a = &lr.agg;
    r.int("deliveries", a.deliveries);
    r.int("expected_deliveries", a.expected);
    r.int("lost", a.lost);
    r.num(
        "lost_pct",
        if a.expected > 0 {
            a.lost as f64 * 100.0 / a.expected as f64
        } else {
            0.0
        },
        3,
    );
    r.int("duplicated", a.dups);
    r.int("order_violations", a.order);
    r.int("parse_errors", a.parse_errors);
    r.int("frames", a.frames);
    r.num(
        "deliveries_per_sec",
        a.deliveries as f64 / lr.recv_window_secs,
        0,
    );
    r.num("recv_window_secs", lr.recv_window_secs, 2);
    r.int("clients_dropped_by_server", a.disconnected);
    if !a.disconnect_reasons.is_empty() {
        let s: Vec<String> = a
            .disconnect_reasons
            .iter()
            .map(|(k, v)| format!("{v}x {k}"))
            .collect();
        r.text("drop_reasons", &s.join("; "));
    }
    latency_rows(r, &a.hist);
    if let Some((first, last)) = &a.per_event {
        // Where one event's latency goes: reaching its first client, then
        // every other (one write per client on the server).
        let ms = |v: u64| v as f64 / 1000.0;
        r.num("event_first_p50_ms", ms(first.quantile(0.50)), 3);
        r.num("event_first_p99_ms", ms(first.quantile(0.99)), 3);
        r.num("event_last_p50_ms", ms(last.quantile(0.50)), 3);
        r.num("event_last_p99_ms", ms(last.quantile(0.99)), 3);
    }
    r.opt_num("server_cpu_secs", lr.cpu_secs, 3);
    r.opt_num(
        "server_cpu_us_per_delivery",
        lr.cpu_secs
            .filter(|_| a.deliveries > 0)
            .map(|c| c * 1e6 / a.deliveries as f64),
        3,
    );
    r.opt_num(
        "server_cpu_pct",
        lr.cpu_secs.map(|c| c * 100.0 / lr.measured_secs),
        1,
    );
    r.opt_num("bench_cpu_secs", lr.bench_cpu_secs, 3);
    r.opt_num(
        "bench_cpu_pct",
        lr.bench_cpu_secs.map(|c| c * 100.0 / lr.measured_secs),
        1,
    );
    // CPU used by everything else on the machine while measuring: if this is
    // not near 0, another workload disturbed the run.
    let other = lr.machine_cpu_secs.map(|m| {
        (m - lr.cpu_secs.unwrap_or(0.0) - lr.bench_cpu_secs.unwrap_or(0.0)).max(0.0) * 100.0
            / lr.measured_secs
    });
    r.opt_num("other_cpu_pct", other.filter(|_| lr.cpu_secs.is_some()), 1);
}

/// `fanout` and `latency`.
pub(crate) async fn mode_load(
    opts: &Opts,
    mode: Mode,
    ep: Arc<Endpoint>,
    srv: &Server,
) -> BoxResult<Report> {
    let plan = LoadPlan {
        clients: opts.clients.unwrap_or(1000).max(1),
        instances: opts.instances.unwrap_or(1).max(1),
        rate: match mode {
            Mode::Latency => Some(opts.rate.unwrap_or(50.0)),
            _ => opts.rate,
        },
    };
    check_fds(plan.clients + opts.publishers + 16)?;
    let rss0 = srv.rss();
    let (lr, _) = run_load(opts, &ep, srv, &plan, None).await?;
    let rss1 = srv.rss();
    let mut r = Report::new();
    header(&mut r, opts, mode);
    load_rows(&mut r, opts, &plan, &lr);
    r.opt_num("server_rss_before_mib", rss0.map(|v| v as f64 / 1024.0), 1);
    r.opt_num(
        "server_rss_loaded_mib",
        lr.rss_loaded_kib.map(|v| v as f64 / 1024.0),
        1,
    );
    r.opt_num("server_rss_after_mib", rss1.map(|v| v as f64 / 1024.0), 1);
    Ok(r)
}
