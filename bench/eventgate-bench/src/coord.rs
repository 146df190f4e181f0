//! One load run over several processes of this tool: a process may hold only
//! about 20,000 open files here, so a run with more clients (three nodes of
//! 19,000 each) is split into one process per node. They meet in a folder
//! (`--coordinate DIR`): each `--listen-only` process writes `ready-<pid>`
//! once its clients are connected; the publishing process waits for
//! `--listeners` such files, writes `started` (when publishing starts) and,
//! after publishing, `published.json` (the events acknowledged per
//! instance), against which every listener accounts its own clients. Owns
//! those files and their waits; the run itself is `load`'s.

use crate::BoxResult;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the publishing process tells the listeners after publishing.
#[derive(Serialize, Deserialize)]
pub(crate) struct Published {
    /// How long publishing took, seconds.
    pub(crate) publish_secs: f64,
    /// Publishes acknowledged per instance.
    pub(crate) ok: Vec<u64>,
}

/// Writes `name` in `dir` whole: readers never see a half-written file.
fn put(dir: &Path, name: &str, body: &str) -> BoxResult<()> {
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, body).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| format!("rename into {}: {e}", dir.display()))
}

/// Polls every `every` until `f` gives a value or `within` has passed.
async fn poll<T>(
    within: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> BoxResult<T> {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= until {
            return Err(format!("gave up after {within:?} waiting for {what}"));
        }
        tokio::time::sleep(every).await;
    }
}

/// A listener: its clients are connected.
pub(crate) fn ready(dir: &Path) -> BoxResult<()> {
    put(dir, &format!("ready-{}", std::process::id()), "")
}

/// The publisher: waits until `listeners` processes are ready.
pub(crate) async fn wait_ready(dir: &Path, listeners: usize, within: Duration) -> BoxResult<()> {
    let count = || {
        std::fs::read_dir(dir).ok().map(|it| {
            it.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("ready-"))
                .count()
        })
    };
    let what = format!("{listeners} listening processes in {}", dir.display());
    poll(within, Duration::from_millis(20), &what, || {
        count().filter(|&n| n >= listeners)
    })
    .await
    .map(|_| ())
}

/// The publisher: publishing starts now.
pub(crate) fn started(dir: &Path) -> BoxResult<()> {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("clock before 1970: {e}"))?
        .as_nanos();
    put(dir, "started", &ns.to_string())
}

/// A listener: waits for publishing to start and returns the local instant it
/// started at (from the wall clock the processes share).
pub(crate) async fn wait_started(dir: &Path, within: Duration) -> BoxResult<Instant> {
    let file = dir.join("started");
    let ns: u128 = poll(
        within,
        Duration::from_millis(1),
        "publishing to start",
        || std::fs::read_to_string(&file).ok()?.trim().parse().ok(),
    )
    .await?;
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("clock before 1970: {e}"))?
        .as_nanos();
    let ago = Duration::from_nanos(u64::try_from(now_ns.saturating_sub(ns)).unwrap_or(0));
    Ok(Instant::now().checked_sub(ago).unwrap_or_else(Instant::now))
}

/// The publisher: what was acknowledged.
pub(crate) fn published(dir: &Path, p: &Published) -> BoxResult<()> {
    let body = serde_json::to_string(p).map_err(|e| format!("published.json: {e}"))?;
    put(dir, "published.json", &body)
}

/// A listener: waits for the publisher's account.
pub(crate) async fn wait_published(dir: &Path, within: Duration) -> BoxResult<Published> {
    let file = dir.join("published.json");
    poll(
        within,
        Duration::from_millis(20),
        "publishing to end",
        || serde_json::from_str(&std::fs::read_to_string(&file).ok()?).ok(),
    )
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A folder of the test's own under the system's temporary folder.
    fn folder(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("eventgate-coord-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_listener_follows_the_publisher_through_the_folder() {
        let dir = folder("follow");
        let quick = Duration::from_secs(5);
        ready(&dir).unwrap();
        wait_ready(&dir, 1, quick).await.unwrap();
        let before = Instant::now();
        started(&dir).unwrap();
        let t0 = wait_started(&dir, quick).await.unwrap();
        // The wall clock and the monotonic one agree within a second here.
        assert!(t0 <= Instant::now());
        assert!(before.saturating_duration_since(t0) < Duration::from_secs(1));
        published(
            &dir,
            &Published {
                publish_secs: 1.5,
                ok: vec![3, 4],
            },
        )
        .unwrap();
        let account = wait_published(&dir, quick).await.unwrap();
        assert_eq!(account.ok, vec![3, 4]);
        assert_eq!(account.publish_secs, 1.5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_publisher_gives_up_on_listeners_that_never_come() {
        let dir = folder("absent");
        ready(&dir).unwrap();
        let err = wait_ready(&dir, 2, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.contains("2 listening processes"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
