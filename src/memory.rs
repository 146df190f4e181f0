//! Gives the memory of departed clients back to the operating system.
//!
//! The C allocator keeps what the process frees for reuse, so without this a
//! node's RSS would stay at its peak after a crowd of clients, or a slow
//! consumer's queued frames, is gone. Every [`PERIOD`], if any client left
//! since the last look, the allocator's free pages are released
//! (`malloc_trim`, glibc; elsewhere nothing is done).

use std::sync::Arc;
use std::time::Duration;

use crate::limits::ConnectionLimits;

/// How often departures are looked for.
pub const PERIOD: Duration = Duration::from_secs(5);

/// Runs for the life of the server: releases free memory after clients left.
pub async fn release_after_departures(limits: Arc<ConnectionLimits>) {
    after_departures(limits, PERIOD, release_free_pages).await;
}

/// Calls `release` (on a blocking thread: it walks every arena) at most
/// once per `period`, and only when clients left since the last call.
async fn after_departures(limits: Arc<ConnectionLimits>, period: Duration, release: fn()) {
    let mut seen = limits.departures();
    loop {
        tokio::time::sleep(period).await;
        let now = limits.departures();
        if now != seen {
            seen = now;
            if let Err(e) = tokio::task::spawn_blocking(release).await {
                log::warn!("releasing free memory failed: {e}");
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // One of the crate's unsafe calls (see `lib.rs`).
fn release_free_pages() {
    // SAFETY: malloc_trim takes each glibc arena's own lock while it walks
    // it; it may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() {}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::domain::{AccountId, InstanceId};
    use crate::settings::LimitSettings;

    static RELEASES: AtomicUsize = AtomicUsize::new(0);

    fn count_release() {
        RELEASES.fetch_add(1, Ordering::SeqCst);
    }

    async fn releases_after(wait: Duration) -> usize {
        tokio::time::sleep(wait).await;
        RELEASES.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn releases_once_after_clients_left_and_not_while_none_leave() {
        let limits = ConnectionLimits::new(&LimitSettings::default());
        let watcher = tokio::spawn(after_departures(
            limits.clone(),
            Duration::from_millis(20),
            count_release,
        ));
        let slot = limits.acquire(InstanceId(1), AccountId(1)).unwrap();
        assert_eq!(
            releases_after(Duration::from_millis(200)).await,
            0,
            "nobody left yet"
        );
        drop(slot);
        let mut released = 0;
        for _ in 0..100 {
            released = releases_after(Duration::from_millis(20)).await;
            if released > 0 {
                break;
            }
        }
        assert_eq!(released, 1, "one release after the client left");
        assert_eq!(
            releases_after(Duration::from_millis(200)).await,
            1,
            "none without departures"
        );
        watcher.abort();
    }
}
