//! The gateways of a soak: `eventgate serve` processes this mode starts on
//! free loopback ports (one on a fresh SQLite file, or two sharing a fresh
//! PostgreSQL database and NATS), kills with SIGKILL and restarts on the
//! same port and database, samples (`/proc`) and stops at the end.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::process::{Child, Command};

use super::api::Api;
use super::SoakArgs;
use crate::BoxResult;

/// Webhook retries of the soak: fast, but covering a receiver outage of a
/// few minutes (about 4.5 minutes in all).
const RETRY_SCHEDULE: &str = "1,2,4,8,15,30,30,30,30,30,30,30,30";

/// One gateway process.
struct Node {
    port: u16,
    child: Option<Child>,
    /// Restarts so far (its stderr goes to a new file each time).
    incarnation: u32,
}

/// The soak's gateways and what they share.
pub(crate) struct Cluster {
    nodes: Mutex<Vec<Node>>,
    ports: Vec<u16>,
    bin: PathBuf,
    out: PathBuf,
    env: Vec<(String, String)>,
    token: String,
    /// The PostgreSQL database made for the run (admin URL, name), dropped at the end.
    pg: Option<(String, String)>,
    client: reqwest::Client,
}

impl Cluster {
    /// Starts the nodes and waits until each is ready.
    pub(crate) async fn start(args: &SoakArgs, token: &str) -> BoxResult<Cluster> {
        let mut env = vec![
            ("EVENTGATE_ACCOUNT_TOKEN".to_string(), token.to_string()),
            ("EVENTGATE_RATE_LIMIT_PER_MINUTE".into(), "100000000".into()),
            (
                "EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE".into(),
                "100000000".into(),
            ),
            ("EVENTGATE_LOG".into(), "warn".into()),
            (
                "EVENTGATE_WEBHOOK_ALLOWED_NETWORKS".into(),
                "127.0.0.0/8".into(),
            ),
            ("EVENTGATE_WEBHOOK_TIMEOUT_SECS".into(), "3".into()),
            (
                "EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS".into(),
                RETRY_SCHEDULE.into(),
            ),
            ("EVENTGATE_WS_HISTORY_SIZE".into(), "2000".into()),
        ];
        let pg = if args.nodes > 1 {
            let name = format!("eventgate_soak_{}", std::process::id());
            psql(&args.pg_url, &format!("DROP DATABASE IF EXISTS {name}")).await?;
            psql(&args.pg_url, &format!("CREATE DATABASE {name}")).await?;
            let base = args
                .pg_url
                .rsplit_once('/')
                .map(|(b, _)| b)
                .unwrap_or(&args.pg_url);
            env.push(("EVENTGATE_DATABASE_URL".into(), format!("{base}/{name}")));
            env.push(("EVENTGATE_NATS_URL".into(), args.nats_url.clone()));
            Some((args.pg_url.clone(), name))
        } else {
            let file = args.out.join("soak.sqlite3");
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
            env.push(("EVENTGATE_DATABASE_URL".into(), file.display().to_string()));
            None
        };
        let mut ports = Vec::new();
        for _ in 0..args.nodes {
            ports.push(free_port()?);
        }
        let cluster = Cluster {
            nodes: Mutex::new(
                ports
                    .iter()
                    .map(|&port| Node {
                        port,
                        child: None,
                        incarnation: 0,
                    })
                    .collect(),
            ),
            ports,
            bin: args.bin.clone(),
            out: args.out.clone(),
            env,
            token: token.to_string(),
            pg,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .map_err(|e| format!("http client: {e}"))?,
        };
        for i in 0..args.nodes {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    pub(crate) fn len(&self) -> usize {
        self.ports.len()
    }

    /// A REST client of node `i`.
    pub(crate) fn api(&self, i: usize) -> Api {
        let port = self.ports.get(i).copied().unwrap_or_default();
        Api::new(self.client.clone(), port, &self.token)
    }

    /// The WebSocket base URL of node `i`.
    pub(crate) fn ws_base(&self, i: usize) -> String {
        format!(
            "ws://127.0.0.1:{}",
            self.ports.get(i).copied().unwrap_or_default()
        )
    }

    /// Process ids of the running nodes, by node.
    pub(crate) fn pids(&self) -> Vec<Option<u32>> {
        self.nodes
            .lock()
            .iter()
            .map(|n| n.child.as_ref().and_then(Child::id))
            .collect()
    }

    fn spawn(&self, i: usize) -> BoxResult<()> {
        let mut nodes = self.nodes.lock();
        let node = nodes.get_mut(i).ok_or("no such node")?;
        let log = self.out.join(format!("node{i}-{}.log", node.incarnation));
        let stderr = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .env("EVENTGATE_BIND", format!("127.0.0.1:{}", node.port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        node.child = Some(
            cmd.spawn()
                .map_err(|e| format!("{}: {e}", self.bin.display()))?,
        );
        node.incarnation += 1;
        Ok(())
    }

    /// Waits until every node answers `/readyz` with 200.
    pub(crate) async fn wait_ready(&self, within: Duration) -> BoxResult<()> {
        let deadline = Instant::now() + within;
        for i in 0..self.len() {
            loop {
                if self.api(i).ready().await {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("node {i} not ready within {within:?}"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// SIGKILLs node `i`, waits for it to die, starts it again and waits
    /// until it is ready.
    pub(crate) async fn kill_and_restart(&self, i: usize) -> BoxResult<()> {
        let child = self.nodes.lock().get_mut(i).and_then(|n| n.child.take());
        if let Some(mut child) = child {
            child.start_kill().map_err(|e| format!("kill: {e}"))?;
            let _ = child.wait().await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.spawn(i)?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    /// Stops every node with SIGTERM (a drain), then drops the database.
    pub(crate) async fn stop_all(&self) {
        let children: Vec<Child> = self
            .nodes
            .lock()
            .iter_mut()
            .filter_map(|n| n.child.take())
            .collect();
        for mut child in children {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
            }
        }
        if let Some((admin, name)) = &self.pg {
            let _ = psql(
                admin,
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            )
            .await;
        }
    }
}

async fn psql(url: &str, sql: &str) -> BoxResult<()> {
    let status = Command::new("psql")
        .arg(url)
        .arg("-qc")
        .arg(sql)
        .stdout(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("psql: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("psql {sql}: {status}"))
    }
}

fn free_port() -> BoxResult<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}
