//! The `idle` mode: many connections that only stay open, and the server's
//! RSS before, while they are connected and after they left — what an idle
//! connection costs. Owns that sequence; must not publish.

use crate::clients::spawn_clients;
use crate::publish::setup_instances;
use crate::report::{header, Report};
use crate::system::{check_fds, Server};
use crate::target::Endpoint;
use crate::{BoxResult, Mode, Opts};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// `idle`: connect `--clients`, hold them `--hold-secs`, sample RSS, close.
pub(crate) async fn mode_idle(opts: &Opts, ep: Arc<Endpoint>, srv: &Server) -> BoxResult<Report> {
    let clients = opts.clients.unwrap_or(19000).max(1);
    let instances = opts.instances.unwrap_or(1).max(1);
    check_fds(clients + 16)?;
    setup_instances(&ep, instances).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = srv.rss();
    let cpu0 = srv.cpu();
    let (stop_tx, stop_rx) = watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let (handles, connected, errors, secs) =
        spawn_clients(opts, &ep, clients, instances, &stop_rx, &received, false).await?;
    tokio::time::sleep(Duration::from_secs_f64(opts.hold_secs)).await;
    let rss1 = srv.rss();
    let cpu1 = srv.cpu();
    let _ = stop_tx.send(true);
    let mut dropped = 0u64;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for h in handles {
        if let Ok(s) = h.await {
            if s.connected {
                if let Some(reason) = s.closed_by_server {
                    dropped += 1;
                    *reasons
                        .entry(reason.chars().take(80).collect())
                        .or_default() += 1;
                }
            }
        }
    }
    // Give the server time to release the sockets, then sample once more.
    tokio::time::sleep(Duration::from_secs_f64(opts.settle_secs)).await;
    let rss2 = srv.rss();
    let mut r = Report::new();
    header(&mut r, opts, Mode::Idle);
    r.int("clients", clients as u64);
    r.int("instances", instances as u64);
    r.int(
        "source_addrs",
        clients.div_ceil(opts.clients_per_addr.max(1)) as u64,
    );
    r.int("clients_connected", connected as u64);
    if !errors.is_empty() {
        r.text("connect_errors", &errors.join("; "));
    }
    r.num("connect_secs", secs, 2);
    r.int("clients_dropped_during_hold", dropped);
    if !reasons.is_empty() {
        let s: Vec<String> = reasons.iter().map(|(k, v)| format!("{v}x {k}")).collect();
        r.text("drop_reasons", &s.join("; "));
    }
    r.opt_num("server_rss_before_mib", rss0.map(|v| v as f64 / 1024.0), 1);
    r.opt_num(
        "server_rss_connected_mib",
        rss1.map(|v| v as f64 / 1024.0),
        1,
    );
    r.opt_num(
        "server_rss_after_close_mib",
        rss2.map(|v| v as f64 / 1024.0),
        1,
    );
    r.opt_num(
        "server_rss_per_conn_kib",
        rss0.zip(rss1)
            .filter(|_| connected > 0)
            .map(|(a, b)| (b as f64 - a as f64) / connected as f64),
        2,
    );
    r.opt_num(
        "server_cpu_secs_connecting",
        cpu0.zip(cpu1).map(|(a, b)| b - a),
        3,
    );
    Ok(r)
}
