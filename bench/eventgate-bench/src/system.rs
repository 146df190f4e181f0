//! What the kernel says about the processes and sockets of a run: the
//! server's CPU seconds and RSS and the machine's busy time from `/proc`,
//! the open-files limit, and one TCP socket's state and queues by sock_diag.
//! Owns reading them; must not decide what a figure means.

use crate::BoxResult;
use std::net::SocketAddr;

/// Clock ticks per second of `/proc/*/stat`.
fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// utime+stime of a process in seconds.
pub(crate) fn proc_cpu_secs(pid: &str, tck: f64) -> BoxResult<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or("malformed stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // after ')' : state(0) ppid(1) ... utime is field 14 overall -> index 11 here
    let ut: f64 = f.get(11).and_then(|s| s.parse().ok()).ok_or("no utime")?;
    let st: f64 = f.get(12).and_then(|s| s.parse().ok()).ok_or("no stime")?;
    Ok((ut + st) / tck)
}

/// VmRSS of a process in KiB.
pub(crate) fn proc_rss_kib(pid: &str) -> BoxResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The server process of a run (`--server-pid`), when given.
pub(crate) struct Server {
    /// Its process id.
    pub(crate) pid: Option<String>,
    /// Clock ticks per second.
    pub(crate) tck: f64,
}

impl Server {
    /// The server named by `--server-pid`; an error when it cannot be read.
    pub(crate) fn new(pid: Option<u32>) -> BoxResult<Server> {
        let srv = Server {
            pid: pid.map(|p| p.to_string()),
            tck: clk_tck(),
        };
        if let Some(pid) = &srv.pid {
            proc_cpu_secs(pid, srv.tck).map_err(|e| format!("--server-pid {pid}: {e}"))?;
        }
        Ok(srv)
    }

    /// Its CPU seconds (user + system) so far.
    pub(crate) fn cpu(&self) -> Option<f64> {
        self.pid
            .as_deref()
            .and_then(|p| proc_cpu_secs(p, self.tck).ok())
    }

    /// Its resident set in KiB.
    pub(crate) fn rss(&self) -> Option<u64> {
        self.pid.as_deref().and_then(|p| proc_rss_kib(p).ok())
    }
}

/// Reads the open-files limit and raises the soft limit to the hard one (via prlimit(1)).
fn raise_nofile() -> (u64, u64) {
    fn read() -> Option<(u64, u64)> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let p = |s: &str| {
            if s == "unlimited" {
                Some(u64::MAX)
            } else {
                s.parse().ok()
            }
        };
        Some((p(f.get(3)?)?, p(f.get(4)?)?))
    }
    let Some((soft, hard)) = read() else {
        return (1024, 1024);
    };
    if soft < hard {
        let h = if hard == u64::MAX {
            "unlimited".to_string()
        } else {
            hard.to_string()
        };
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={h}:{h}"))
            .output();
    }
    read().unwrap_or((soft, hard))
}

/// Busy CPU seconds of the whole machine (all cores) from /proc/stat.
pub(crate) fn machine_busy_secs(tck: f64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0.0);
    let total: f64 = v.iter().take(8).sum();
    Some((total - idle) / tck)
}

/// File descriptors this process has open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Raises the open-files limit and checks that about `needed` more fit.
pub(crate) fn check_fds(needed: usize) -> BoxResult<()> {
    let (soft, hard) = raise_nofile();
    let have = soft.saturating_sub(open_fds() as u64);
    if (needed as u64) > have {
        return Err(format!(
            "need about {needed} file descriptors but only {have} are free (RLIMIT_NOFILE soft {soft}, hard {hard}); \
             lower --clients or raise the limit (ulimit -n)"
        ));
    }
    Ok(())
}
/// The kernel's view of the TCP socket with this local and remote address:
/// (state, send queue, receive queue), or None when there is no such socket.
pub(crate) fn tcp_entry(local: SocketAddr, remote: SocketAddr) -> Option<(u8, u64, u64)> {
    use std::io::{Read, Write};
    // A sock_diag request for this one socket is a hash lookup in the kernel.
    // Reading /proc/net/tcp instead walks every socket bucket of the machine,
    // ~7 ms of kernel time per read: done every 100 ms it alone doubled the
    // p99 of the fast clients being measured.
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const HEADER: usize = 16;
    let (SocketAddr::V4(l), SocketAddr::V4(r)) = (local, remote) else {
        return None;
    };
    let ip = |a: &std::net::SocketAddrV4| {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a.ip().octets());
        b
    };
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes()); // nlmsghdr: length
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]); // sequence, port id
                                      // inet_diag_req_v2: family, protocol, extensions, pad, states (all)
    req.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: ports and addresses (network order), interface, no cookie
    req.extend_from_slice(&l.port().to_be_bytes());
    req.extend_from_slice(&r.port().to_be_bytes());
    req.extend_from_slice(&ip(&l));
    req.extend_from_slice(&ip(&r));
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]);
    let sock = socket2::Socket::new(
        socket2::Domain::from(libc::AF_NETLINK),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::from(libc::NETLINK_SOCK_DIAG)),
    )
    .ok()?;
    // Unaddressed netlink messages go to the kernel.
    if (&sock).write(&req).ok()? != req.len() {
        return None;
    }
    let mut buf = [0u8; 512];
    let n = (&sock).read(&mut buf).ok()?;
    // The answer is an inet_diag_msg (or an error: no such socket).
    let msg = buf.get(HEADER..n)?;
    if u16::from_ne_bytes([buf[4], buf[5]]) != SOCK_DIAG_BY_FAMILY || msg.len() < 64 {
        return None;
    }
    // Once the connection is gone the lookup falls back to the listener:
    // only a socket with the asked-for remote port is this one.
    if msg[6..8] != r.port().to_be_bytes() {
        return None;
    }
    let word = |at: usize| u32::from_ne_bytes([msg[at], msg[at + 1], msg[at + 2], msg[at + 3]]);
    // state at 1; after the 48-byte sockid (from 4): expires, rqueue, wqueue
    Some((msg[1], u64::from(word(60)), u64::from(word(56))))
}

/// The name of a kernel TCP state (`include/net/tcp_states.h`).
pub(crate) fn tcp_state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "?",
    }
}
