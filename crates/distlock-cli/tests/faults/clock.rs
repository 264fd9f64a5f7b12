//! The clock nemesis: a store process started under libfaketime (Debian `faketime`) whose wall
//! clock the harness moves while it runs, by rewriting the offset file libfaketime reads on
//! every clock call. Only the wall clock moves (`CLOCK_REALTIME`: `clock_gettime`,
//! `gettimeofday`, `time`); the monotonic clock is left alone, as NTP stepping a machine's clock
//! leaves it. libfaketime reaches a program through its libc calls, so it works for Redis and our
//! server but not for Go programs such as etcd, which read the clock through the vDSO directly.
//!
//! Debian's `redis-server` links jemalloc, which calls `clock_gettime` while libfaketime is still
//! initialising and makes it give up (wolfcw/libfaketime#130); tcmalloc is preloaded in front of
//! it so that jemalloc is never initialised. [`FakeClock::assert_reaches`] proves the offset
//! reaches each process before a case relies on it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where Debian (and other distributions) install the two libraries, per architecture.
const LIB_DIRS: &[&str] =
    &["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"];

/// Finds `file` under one of [`LIB_DIRS`] or panics with the install command.
fn library(file: &str, package: &str) -> PathBuf {
    LIB_DIRS.iter().map(|d| Path::new(d).join(file)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "`{file}` is not installed; the clock nemesis needs it.\n\
             Install it with: sudo apt-get install -y {package}   (./scripts/test.sh does this when run as root)"
        )
    })
}

/// A wall-clock offset shared by the processes started with [`FakeClock::env`].
pub struct FakeClock {
    _dir: tempfile::TempDir,
    file: PathBuf,
    preload: String,
}

impl FakeClock {
    /// A clock at offset 0.
    pub fn new() -> FakeClock {
        let faketime = library("faketime/libfaketime.so.1", "libfaketime");
        let tcmalloc = library("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4");
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = FakeClock {
            file: dir.path().join("offset"),
            _dir: dir,
            preload: format!("{} {}", tcmalloc.display(), faketime.display()),
        };
        clock.set(0);
        clock
    }

    /// The environment that puts a process under this clock.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", self.preload.clone()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            // Read the offset on every call: a jump takes effect at once.
            ("FAKETIME_NO_CACHE", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
            // A process's child (a restarted store is a new process) starts on the same offset.
            ("FAKETIME_DONT_RESET", "1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Puts the wall clock `ms` milliseconds away from the real one (a jump from wherever it was).
    /// The file is replaced whole (written aside, renamed), so a process never reads half of it.
    pub fn set(&self, ms: i64) {
        let aside = self.file.with_extension("new");
        std::fs::write(&aside, format!("{:+.3}\n", ms as f64 / 1000.0)).expect("write the clock offset");
        std::fs::rename(&aside, &self.file).expect("move the clock offset into place");
    }

    /// Moves the clock 1,000 s ahead, asks `what` for its time with `read` (seconds since the
    /// epoch), and panics unless the answer moved with it; then sets the clock back.
    pub fn assert_reaches(&self, what: &str, read: impl Fn() -> Option<u64>) {
        const AHEAD: u64 = 1000;
        self.set(AHEAD as i64 * 1000);
        let real = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let seen = read();
        self.set(0);
        let moved = seen.is_some_and(|s| s.abs_diff(real + AHEAD) <= 5);
        assert!(
            moved,
            "libfaketime did not reach {what}: its clock read {seen:?}, expected ~{}",
            real + AHEAD
        );
    }
}

/// The wall time `redis-server` on `port` reports (`TIME`), in seconds.
pub fn redis_time(port: u16) -> Option<u64> {
    // `*2 $10 <seconds> $6 <microseconds>`, one per line.
    let reply = crate::common::support::topologies::raw(port, "TIME");
    reply.lines().nth(2)?.trim().parse().ok()
}

/// The wall time of the HTTP server at `port`, from its `Date` header, in seconds.
pub fn http_time(port: u16) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /livez HTTP/1.0\r\n\r\n").ok()?;
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    let date = reply.lines().find_map(|l| l.strip_prefix("date: ").or_else(|| l.strip_prefix("Date: ")))?;
    let at = httpdate::parse_http_date(date.trim()).ok()?;
    at.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}
