//! `eventgate-bench`: the load benchmark for WebSocket fan-out gateways.
//!
//! Its own package in the workspace, apart from the gateway: it uses nothing
//! of the `eventgate` library and speaks to every server only over loopback
//! sockets, so that eventgate and the reference peers of `../shared/peers`
//! (gorilla-hub, node-ws, uws-hub) are measured by the same client.
//! `bench/run.sh` runs it per scenario and `bench/report.py` reads its JSON
//! lines; this file owns the command line, the modes' dispatch and `main`.
//! It must not learn a server's internals: only its public protocol.
//!
//! Modes: `fanout` (max rate or `--rate`), `latency` (fixed rate), `idle`
//! (many idle connections, RSS per connection) and `stalled` (fast clients
//! plus one client that never reads); `floor` serves the floor target, the
//! least work a fan-out server can do, to measure what the machine and this
//! tool allow at all. Traffic only ever goes to 127.0.0.0/8.
//!
//! The rooms:
//! - [`target`]: each server's protocol (paths, auth, publish bodies);
//! - [`publish`]: keep-alive HTTP/1.1 publishers (hyper) and instance setup;
//! - [`clients`]: WebSocket clients (tokio-tungstenite) and their
//!   loss/duplicate/order accounting;
//! - [`latency`]: latency histograms (HdrHistogram);
//! - [`load`], [`idle`], [`stalled`]: the measuring modes;
//! - [`coord`]: one load run split over several processes;
//! - [`floor`]: the floor server;
//! - [`system`]: `/proc` and sock_diag samplers of CPU, RSS and sockets;
//! - [`report`]: the human table and the JSON line.

mod clients;
mod coord;
mod floor;
mod idle;
mod latency;
mod load;
mod publish;
mod report;
mod soak;
mod stalled;
mod storm;
mod system;
mod target;
mod webhook;

use clap::{Parser, Subcommand};
use std::sync::Arc;
use std::time::Duration;
use target::{Endpoint, Target};

const HELP_HINT: &str = "\
Targets:
  gorilla / node / uws: GET /ws/{instance}, POST /publish/{instance}, no auth.
  floor:          the same protocol, served by `eventgate-bench floor --url URL`:
                  one blocking write per client per event and nothing else, the
                  least any gateway can do (fanout/latency only).
  eventgate:      needs --token (the server's EVENTGATE_ACCOUNT_TOKEN); instances
                  bench-<i> are created with POST /api/instance/new.
  For eventgate, start the server with the rate limits raised, e.g.
    EVENTGATE_RATE_LIMIT_PER_MINUTE=100000000 \\
    EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE=100000000
  otherwise /ws upgrades and instance creation are throttled (429).

Published data: {\"seq\":N,\"p\":PUBLISHER,\"ts\":UNIX_NANOS,\"pad\":\"xxx..\"},
padded so the request body is about --event-bytes. seq is per instance; each
publisher waits for the reply before its next request, so order is checked
per (client, publisher). Loss = events acknowledged (2xx) but not received.

Output: a human table on stdout; with --json the table goes to stderr and
stdout gets exactly one JSON line.

Examples:
  eventgate-bench fanout  --target gorilla --url http://127.0.0.1:8081 --clients 1000 --instances 1 --server-pid PID
  eventgate-bench latency --target node --url http://127.0.0.1:8082 --rate 50 --clients 1000 --server-pid PID
  eventgate-bench latency --target uws --url http://127.0.0.1:8084 --rate 150 --clients 1000 --server-pid PID
  eventgate-bench idle    --target eventgate --token T --url http://127.0.0.1:8080 --clients 19000 --server-pid PID
  eventgate-bench stalled --target gorilla --url http://127.0.0.1:8081 --rate 5000 --server-pid PID";

/// Errors of the tool: one line for the operator.
type BoxResult<T> = Result<T, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Subcommand)]
pub(crate) enum Mode {
    /// C clients over I instances; publish as fast as possible (or at --rate) for --secs.
    Fanout,
    /// Like fanout at a fixed --rate (default 50 events/s); for latency percentiles.
    Latency,
    /// Open --clients idle connections (default 19000) and report server RSS per connection.
    Idle,
    /// --clients fast clients (default 10) plus one client that never reads, at --rate (default 5000).
    Stalled,
    /// Serve on --url as the floor target: the least work a fan-out server
    /// can do (see `serve_floor`); runs until killed.
    Floor,
    /// eventgate: a reconnect storm, plain and then recovering (see `storm`).
    Storm,
    /// eventgate: durable webhook delivery against the raw POST rate (see `webhook`).
    Webhook,
    /// Start gateways and run churn, bursts, settings changes, flapping
    /// webhook receivers and faults for --minutes, checking everything (see `soak`).
    Soak,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Fanout => "fanout",
            Mode::Latency => "latency",
            Mode::Idle => "idle",
            Mode::Stalled => "stalled",
            Mode::Floor => "floor",
            Mode::Storm => "storm",
            Mode::Webhook => "webhook",
            Mode::Soak => "soak",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "eventgate-bench",
    version,
    about = "Load benchmark for eventgate and reference WebSocket fan-out gateways (loopback only)",
    after_help = HELP_HINT
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    #[command(flatten)]
    opts: Opts,
    #[command(flatten)]
    soak: soak::SoakArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Opts {
    /// Which server protocol to speak.
    #[arg(long, global = true, value_enum, default_value = "gorilla")]
    pub(crate) target: Target,
    /// Base URL of the server; must be on 127.0.0.0/8.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8081")]
    pub(crate) url: String,
    /// eventgate account token (the server's EVENTGATE_ACCOUNT_TOKEN).
    #[arg(long, global = true)]
    pub(crate) token: Option<String>,
    /// WebSocket clients [fanout/latency: 1000, idle: 19000, stalled: 10 fast ones].
    #[arg(long, global = true)]
    pub(crate) clients: Option<usize>,
    /// Instances the clients are spread over (round robin) [1].
    #[arg(long, global = true)]
    pub(crate) instances: Option<usize>,
    /// Publishing duration in seconds.
    #[arg(long, global = true, default_value_t = 10.0)]
    pub(crate) secs: f64,
    /// Concurrent keep-alive publisher connections.
    #[arg(long, global = true, default_value_t = 4)]
    pub(crate) publishers: usize,
    /// Total publish rate in events/s [fanout: unlimited, latency: 50, stalled: 5000].
    #[arg(long, global = true)]
    pub(crate) rate: Option<f64>,
    /// Approximate size of the published request body in bytes.
    #[arg(long, global = true, default_value_t = 200)]
    pub(crate) event_bytes: usize,
    /// Seconds to wait after publishing for deliveries still in flight.
    #[arg(long, global = true, default_value_t = 2.0)]
    pub(crate) drain_secs: f64,
    /// Server process id: report its CPU seconds and RSS from /proc.
    #[arg(long, global = true)]
    pub(crate) server_pid: Option<u32>,
    /// Tokio worker threads of the bench (the server shares the cores).
    #[arg(long, global = true, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Print one JSON line on stdout (the human table goes to stderr).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Free-form label copied into the report (e.g. the scenario name).
    #[arg(long, global = true)]
    pub(crate) label: Option<String>,
    /// Clients per source address; sources are 127.0.0.2, 127.0.0.3, ...
    #[arg(long, global = true, default_value_t = 1000)]
    pub(crate) clients_per_addr: usize,
    /// WebSocket handshakes in flight at once while connecting.
    #[arg(long, global = true, default_value_t = 200)]
    pub(crate) connect_concurrency: usize,
    /// Seconds to wait before connecting clients gives up.
    #[arg(long, global = true, default_value_t = 120.0)]
    pub(crate) connect_timeout_secs: f64,
    /// idle: seconds to hold the connections before sampling RSS.
    #[arg(long, global = true, default_value_t = 3.0)]
    pub(crate) hold_secs: f64,
    /// stalled: SO_RCVBUF of the stalled socket in bytes.
    #[arg(long, global = true, default_value_t = 4096)]
    pub(crate) stall_rcvbuf: u32,
    /// Where clients connect, comma-separated (default: --url): clients are
    /// spread over these round-robin, e.g. two nodes of one cluster while
    /// --url (the publisher's) names one of them.
    #[arg(long, global = true)]
    pub(crate) client_urls: Option<String>,
    /// stalled: seconds to wait (after the drain) for the server to close the stalled socket,
    /// and again for reading it to EOF.
    #[arg(long, global = true, default_value_t = 10.0)]
    pub(crate) stall_wait_secs: f64,
    /// stalled: seconds of the same load without the stalled client first,
    /// so that the RSS compared before and after is the warm server's [--secs].
    #[arg(long, global = true)]
    pub(crate) warmup_secs: Option<f64>,
    /// storm: events published while the clients are away.
    #[arg(long, global = true, default_value_t = 100)]
    pub(crate) storm_events: usize,
    /// webhook: events queued while the receiver is down.
    #[arg(long, global = true, default_value_t = 100_000)]
    pub(crate) backlog: u64,
    /// webhook: shell command that SIGKILLs the server and starts it again
    /// (returning once it is ready); runs --kills times during a publish stream.
    #[arg(long, global = true)]
    pub(crate) restart_cmd: Option<String>,
    /// webhook: restarts by --restart-cmd.
    #[arg(long, global = true, default_value_t = 20)]
    pub(crate) kills: u32,
    /// fanout/latency over several processes of this tool (see `coord`): the
    /// folder they meet in.
    #[arg(long, global = true)]
    pub(crate) coordinate: Option<std::path::PathBuf>,
    /// With --coordinate: connect the clients and account them, but publish
    /// nothing; the process without this flag publishes.
    #[arg(long, global = true)]
    pub(crate) listen_only: bool,
    /// With --coordinate, the publishing process: how many --listen-only
    /// processes to wait for before publishing.
    #[arg(long, global = true, default_value_t = 0)]
    pub(crate) listeners: usize,
    /// stalled, idle: seconds after every client is gone before the RSS
    /// "after" is read (a server may give freed memory back periodically).
    #[arg(long, global = true, default_value_t = 6.0)]
    pub(crate) settle_secs: f64,
}
// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

async fn run(cli: Cli) -> BoxResult<()> {
    if cli.mode == Mode::Soak {
        return soak::mode_soak(cli.soak).await;
    }
    let opts = cli.opts;
    let ep = Arc::new(Endpoint::parse(&opts)?);
    let srv = system::Server::new(opts.server_pid)?;
    let report = match cli.mode {
        Mode::Fanout | Mode::Latency => load::mode_load(&opts, cli.mode, ep, &srv).await?,
        Mode::Idle => idle::mode_idle(&opts, ep, &srv).await?,
        Mode::Stalled => stalled::mode_stalled(&opts, ep, &srv).await?,
        Mode::Storm => storm::mode_storm(&opts, ep, &srv).await?,
        Mode::Webhook => webhook::mode_webhook(&opts, ep, &srv).await?,
        Mode::Floor => return Err("floor runs without the async runtime".into()),
        Mode::Soak => return Err("soak runs on its own".into()),
    };
    report.emit(opts.json);
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if cli.mode == Mode::Floor {
        let res = target::parse_loopback_url(&cli.opts.url)
            .and_then(|(addr, _)| floor::serve_floor(addr));
        if let Err(e) = res {
            eprintln!("eventgate-bench floor: {e}");
            std::process::exit(1);
        }
        return;
    }
    // Needed when cargo unified reqwest's features with the gateway's
    // (`rustls-no-provider`); harmless otherwise. The tool speaks plain HTTP.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let threads = cli.opts.threads.max(1);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("eventgate-bench: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let res = rt.block_on(run(cli));
    rt.shutdown_timeout(Duration::from_secs(1));
    if let Err(e) = res {
        eprintln!("eventgate-bench: {e}");
        std::process::exit(1);
    }
}
