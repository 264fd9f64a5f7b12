//! A disk in memory for the power-loss tests (`tests/power_loss.rs`): not part of the server's
//! API (hidden from the docs), but public so integration tests can run the store on it.
//!
//! It models the page cache: a write lands in the cache; `sync_data`/`sync_all` make a file's
//! writes durable; a file created, renamed or removed changes the durable directory only after
//! `sync_dir`. [`SimDisk::power_loss`] keeps only what is durable (optionally tearing the last
//! unsynced write at a sector boundary), [`SimDisk::restart`] keeps the cache (a process that
//! died, a machine that did not). A failed sync behaves as Linux does since "fsyncgate": the
//! writes it should have flushed are dropped from the disk's future (a later sync that succeeds
//! does not bring them back) while reads still see them.
//!
//! A [`Plan`] makes the `nth` operation of one [`Step`] fail (EIO, or ENOSPC for writes) or
//! crash the disk (every later operation fails, as if the power went).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::disk::{Disk, DiskFile};

/// A named step of the log's work on disk, where a fault can strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// Writing a batch of records into a segment.
    Append,
    /// The `fdatasync` of a batch.
    Sync,
    /// Creating a segment full of zeros and syncing it.
    Preallocate,
    /// Writing a snapshot's temporary file.
    SnapshotWrite,
    /// Syncing a snapshot's temporary file.
    SnapshotSync,
    /// Renaming the snapshot into place.
    Rename,
    /// Syncing the data directory.
    DirSync,
    /// Cutting a segment's tail (recovery).
    Truncate,
    /// Removing a file older than the newest snapshot.
    Remove,
}

impl Step {
    /// Every step.
    pub const ALL: [Step; 9] = [
        Step::Append,
        Step::Sync,
        Step::Preallocate,
        Step::SnapshotWrite,
        Step::SnapshotSync,
        Step::Rename,
        Step::DirSync,
        Step::Truncate,
        Step::Remove,
    ];

    /// The step's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Step::Append => "append",
            Step::Sync => "sync",
            Step::Preallocate => "preallocate",
            Step::SnapshotWrite => "snapshot-write",
            Step::SnapshotSync => "snapshot-sync",
            Step::Rename => "rename",
            Step::DirSync => "dir-sync",
            Step::Truncate => "truncate",
            Step::Remove => "remove",
        }
    }

    /// Whether the step writes data (its failure is ENOSPC; the others' is EIO).
    pub fn writes(self) -> bool {
        matches!(self, Step::Append | Step::Preallocate | Step::SnapshotWrite)
    }
}

/// What happens at the planned step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The step fails: ENOSPC for a write (half of it written), EIO otherwise (a sync drops the
    /// writes it should have flushed). Later operations succeed again.
    Fail,
    /// The power goes at the step, after it is done (`done`) or before; every later operation
    /// fails.
    Crash {
        /// Whether the step itself took effect first.
        done: bool,
    },
}

/// How a power loss tears the last unsynced write: cut at one of the `sector` boundaries inside
/// it (`pick` chooses which), keeping what comes before the cut (`tail: false`, a write cut
/// short) or, with `tail`, what comes after it (a device that wrote the later sectors first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tear {
    /// The sector size: 512 or 4096.
    pub sector: u64,
    /// Chooses the boundary among those inside the write.
    pub pick: u64,
    /// Keep the part after the cut instead of the part before it.
    pub tail: bool,
}

/// A fault at the `nth` (from 1) operation of `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Where.
    pub step: Step,
    /// Which occurrence, from 1.
    pub nth: u32,
    /// What.
    pub fault: Fault,
}

#[derive(Debug, Clone)]
enum Op {
    Write { seq: u64, offset: u64, bytes: Vec<u8> },
    SetLen { len: u64 },
}

fn apply(data: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, bytes, .. } => {
            let (start, end) = (*offset as usize, *offset as usize + bytes.len());
            if data.len() < end {
                data.resize(end, 0);
            }
            data[start..end].copy_from_slice(bytes);
        }
        Op::SetLen { len } => data.resize(*len as usize, 0),
    }
}

#[derive(Debug, Clone, Default)]
struct Inode {
    /// What reads see (the page cache).
    data: Vec<u8>,
    /// What survives a power loss.
    durable: Vec<u8>,
    /// Changes since the last sync, in order.
    unsynced: Vec<Op>,
}

#[derive(Debug, Clone, Default)]
struct State {
    inodes: Vec<Inode>,
    names: BTreeMap<PathBuf, usize>,
    durable_names: BTreeMap<PathBuf, usize>,
    seq: u64,
    plan: Option<Plan>,
    counts: BTreeMap<Step, u32>,
    fired: Option<Plan>,
    crashed: bool,
    /// How many more of the log's syncs may pass; `None`: all (see [`SimDisk::hold_syncs`]).
    syncs_allowed: Option<u32>,
    /// The log's syncs waiting for leave to pass.
    syncs_waiting: u32,
}

/// The in-memory disk; clones share it. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
    /// Wakes syncs held by [`SimDisk::hold_syncs`].
    syncs_resumed: Arc<Condvar>,
}

/// A file open on a [`SimDisk`].
#[derive(Debug)]
pub struct SimFile {
    disk: SimDisk,
    inode: usize,
    /// A segment (`wal-*`): its writes are appends, its syncs the log's syncs.
    segment: bool,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated EIO: {what}"))
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

fn powered_off() -> io::Error {
    io::Error::other("simulated power loss: the disk is gone")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display()))
}

impl State {
    /// Counts an operation of `step` and tells whether the plan strikes it; a disk that has
    /// crashed refuses everything.
    fn step(&mut self, step: Step) -> io::Result<Option<Fault>> {
        if self.crashed {
            return Err(powered_off());
        }
        let n = self.counts.entry(step).or_default();
        *n += 1;
        match self.plan {
            Some(plan) if plan.step == step && plan.nth == *n => {
                self.plan = None;
                self.fired = Some(plan);
                Ok(Some(plan.fault))
            }
            _ => Ok(None),
        }
    }

    /// Runs `op` under the fault the step drew: a failure answers `failed` (after `op` when
    /// `partial` runs it anyway), a crash runs `op` or not and then turns the power off.
    fn run<T>(
        &mut self,
        step: Step,
        op: impl FnOnce(&mut State, bool) -> io::Result<T>,
        failed: impl FnOnce() -> io::Error,
    ) -> io::Result<T> {
        match self.step(step)? {
            None => op(self, false),
            Some(Fault::Fail) => {
                let _ = op(self, true);
                Err(failed())
            }
            Some(Fault::Crash { done }) => {
                if done {
                    let _ = op(self, false);
                }
                self.crashed = true;
                Err(powered_off())
            }
        }
    }

    fn inode(&mut self, path: &Path) -> io::Result<usize> {
        self.names.get(path).copied().ok_or_else(|| not_found(path))
    }

    fn new_inode(&mut self, path: &Path) -> usize {
        self.inodes.push(Inode::default());
        let inode = self.inodes.len() - 1;
        self.names.insert(path.to_owned(), inode);
        inode
    }

    fn write(&mut self, inode: usize, offset: u64, bytes: &[u8]) {
        self.seq += 1;
        let op = Op::Write { seq: self.seq, offset, bytes: bytes.to_vec() };
        let node = &mut self.inodes[inode];
        apply(&mut node.data, &op);
        node.unsynced.push(op);
    }

    /// A sync that succeeds (`ok`) makes the inode's changes durable; one that fails drops them
    /// from the disk's future.
    fn sync(&mut self, inode: usize, ok: bool) {
        let node = &mut self.inodes[inode];
        for op in std::mem::take(&mut node.unsynced) {
            if ok {
                apply(&mut node.durable, &op);
            }
        }
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state as consistent as any other moment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms `plan` (replacing any earlier one) and starts counting steps afresh.
    pub fn plan(&self, plan: Option<Plan>) {
        let mut s = self.lock();
        s.plan = plan;
        s.counts.clear();
    }

    /// The planned fault, once it has struck.
    pub fn fired(&self) -> Option<Plan> {
        self.lock().fired
    }

    /// While `held`, the log's syncs (of segments) wait, as on a stalled disk, until let through
    /// ([`SimDisk::let_syncs_pass`]): what the log writes stays unsynced and nothing is
    /// acknowledged. A test that holds syncs must let them go
    /// even when it fails, or dropping the store waits for its writer forever.
    pub fn hold_syncs(&self, held: bool) {
        self.lock().syncs_allowed = held.then_some(0);
        self.syncs_resumed.notify_all();
    }

    /// Lets `n` more of the log's syncs pass while they are held.
    pub fn let_syncs_pass(&self, n: u32) {
        let mut s = self.lock();
        s.syncs_allowed = s.syncs_allowed.map(|k| k + n);
        drop(s);
        self.syncs_resumed.notify_all();
    }

    /// How many of the log's syncs are waiting for leave to pass (see [`SimDisk::hold_syncs`]).
    pub fn syncs_waiting(&self) -> u32 {
        self.lock().syncs_waiting
    }

    /// Whether the disk has crashed (every operation fails).
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// How many operations of each step were made since the last [`SimDisk::plan`].
    pub fn counts(&self) -> BTreeMap<Step, u32> {
        self.lock().counts.clone()
    }

    /// The disk a process restarted on it finds: the cache as it is (nothing lost, no plan).
    pub fn restart(&self) -> SimDisk {
        let s = self.lock();
        let state = State {
            plan: None,
            counts: BTreeMap::new(),
            fired: None,
            crashed: false,
            syncs_allowed: None,
            syncs_waiting: 0,
            ..s.clone()
        };
        SimDisk { state: Arc::new(Mutex::new(state)), ..SimDisk::default() }
    }

    /// The disk after a power loss: only durable data and directory entries. With `tear`, the
    /// last unsynced write of a file that survives also reaches the disk in part (see [`Tear`]).
    pub fn power_loss(&self, tear: Option<Tear>) -> SimDisk {
        let s = self.lock();
        let mut inodes: Vec<Inode> = s
            .inodes
            .iter()
            .map(|n| Inode { data: n.durable.clone(), durable: n.durable.clone(), unsynced: Vec::new() })
            .collect();
        if let Some(Tear { sector, pick, tail }) = tear {
            let last = s
                .durable_names
                .values()
                .flat_map(|&i| s.inodes[i].unsynced.iter().map(move |op| (i, op)))
                .filter_map(|(i, op)| match op {
                    Op::Write { seq, offset, bytes } => Some((*seq, i, *offset, bytes)),
                    Op::SetLen { .. } => None,
                })
                .max_by_key(|w| w.0);
            if let Some((_, i, offset, bytes)) = last {
                let end = offset + bytes.len() as u64;
                let cuts: Vec<u64> = (offset / sector + 1..=end.saturating_sub(1) / sector)
                    .map(|k| k * sector)
                    .filter(|&b| b > offset && b < end)
                    .collect();
                if !cuts.is_empty() {
                    let cut = cuts[(pick % cuts.len() as u64) as usize];
                    let at = (cut - offset) as usize;
                    let op = if tail {
                        Op::Write { seq: 0, offset: cut, bytes: bytes[at..].to_vec() }
                    } else {
                        Op::Write { seq: 0, offset, bytes: bytes[..at].to_vec() }
                    };
                    apply(&mut inodes[i].data, &op);
                    apply(&mut inodes[i].durable, &op);
                }
            }
        }
        let state = State {
            inodes,
            names: s.durable_names.clone(),
            durable_names: s.durable_names.clone(),
            ..State::default()
        };
        SimDisk { state: Arc::new(Mutex::new(state)), ..SimDisk::default() }
    }

    /// The files the cache holds now, with their content (for reports).
    pub fn files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let s = self.lock();
        s.names.iter().map(|(p, &i)| (p.clone(), s.inodes[i].data.clone())).collect()
    }

    fn open(&self, path: &Path, inode: usize) -> SimFile {
        let segment = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("wal-"));
        SimFile { disk: self.clone(), inode, segment }
    }
}

impl DiskFile for SimFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let step = if self.segment { Step::Append } else { Step::SnapshotWrite };
        let inode = self.inode;
        self.disk.lock().run(
            step,
            |s, partial| {
                s.write(inode, offset, if partial { &buf[..buf.len() / 2] } else { buf });
                Ok(())
            },
            enospc,
        )
    }

    fn sync_data(&self) -> io::Result<()> {
        let step = if self.segment { Step::Sync } else { Step::SnapshotSync };
        let inode = self.inode;
        let mut disk = self.disk.lock();
        if self.segment && disk.syncs_allowed.is_some() {
            disk.syncs_waiting += 1;
            while disk.syncs_allowed == Some(0) {
                disk = self.disk.syncs_resumed.wait(disk).unwrap_or_else(|e| e.into_inner());
            }
            disk.syncs_waiting -= 1;
            disk.syncs_allowed = disk.syncs_allowed.map(|k| k - 1);
        }
        disk.run(
            step,
            |s, failed| {
                s.sync(inode, !failed);
                Ok(())
            },
            || eio("sync"),
        )
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let inode = self.inode;
        self.disk.lock().run(
            Step::Truncate,
            |s, failed| {
                if !failed {
                    let node = &mut s.inodes[inode];
                    let op = Op::SetLen { len };
                    apply(&mut node.data, &op);
                    node.unsynced.push(op);
                }
                Ok(())
            },
            || eio("truncate"),
        )
    }
}

impl Disk for SimDisk {
    type File = SimFile;

    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        if self.crashed() {
            return Err(powered_off());
        }
        Ok(())
    }

    fn create_new(&self, path: &Path) -> io::Result<SimFile> {
        let mut s = self.lock();
        if s.crashed {
            return Err(powered_off());
        }
        if s.names.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display())));
        }
        let inode = s.new_inode(path);
        drop(s);
        Ok(self.open(path, inode))
    }

    fn create(&self, path: &Path) -> io::Result<SimFile> {
        let mut s = self.lock();
        if s.crashed {
            return Err(powered_off());
        }
        let inode = match s.names.get(path) {
            Some(&inode) => {
                let node = &mut s.inodes[inode];
                let op = Op::SetLen { len: 0 };
                apply(&mut node.data, &op);
                node.unsynced.push(op);
                inode
            }
            None => s.new_inode(path),
        };
        drop(s);
        Ok(self.open(path, inode))
    }

    fn open_write(&self, path: &Path) -> io::Result<SimFile> {
        let mut s = self.lock();
        if s.crashed {
            return Err(powered_off());
        }
        let inode = s.inode(path)?;
        drop(s);
        Ok(self.open(path, inode))
    }

    fn preallocate(&self, path: &Path, size: u64, head: &[u8]) -> io::Result<SimFile> {
        let mut s = self.lock();
        if s.names.contains_key(path) && !s.crashed {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display())));
        }
        let inode = s.run(
            Step::Preallocate,
            |s, failed| {
                let inode = s.new_inode(path);
                // A failure runs out of space half-way; a success is whole and synced.
                let mut data = vec![0; (size as usize).max(head.len())];
                data[..head.len()].copy_from_slice(head);
                data.truncate(if failed { size as usize / 2 } else { data.len() });
                s.write(inode, 0, &data);
                if !failed {
                    s.sync(inode, true);
                }
                Ok(inode)
            },
            enospc,
        )?;
        drop(s);
        Ok(self.open(path, inode))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut s = self.lock();
        if s.crashed {
            return Err(powered_off());
        }
        let inode = s.inode(path)?;
        Ok(s.inodes[inode].data.clone())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.lock().run(
            Step::Rename,
            |s, failed| {
                let inode = s.inode(from)?;
                if !failed {
                    s.names.remove(from);
                    s.names.insert(to.to_owned(), inode);
                }
                Ok(())
            },
            || eio("rename"),
        )
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.lock().run(
            Step::Remove,
            |s, failed| {
                s.inode(path)?;
                if !failed {
                    s.names.remove(path);
                }
                Ok(())
            },
            || eio("remove"),
        )
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let s = self.lock();
        if s.crashed {
            return Err(powered_off());
        }
        Ok(s.names.keys().filter(|p| p.parent() == Some(dir)).cloned().collect())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.lock().run(
            Step::DirSync,
            |s, failed| {
                if !failed {
                    s.durable_names.retain(|p, _| p.parent() != Some(dir));
                    let entries: Vec<(PathBuf, usize)> = s
                        .names
                        .iter()
                        .filter(|(p, _)| p.parent() == Some(dir))
                        .map(|(p, &i)| (p.clone(), i))
                        .collect();
                    s.durable_names.extend(entries);
                }
                Ok(())
            },
            || eio("directory sync"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        PathBuf::from("/data")
    }

    #[test]
    fn only_synced_data_and_entries_survive_a_power_loss() {
        let disk = SimDisk::new();
        let (a, b) = (dir().join("wal-1.log"), dir().join("snapshot.tmp"));
        let f = disk.create_new(&a).unwrap();
        f.write_all_at(b"synced", 0).unwrap();
        f.sync_data().unwrap();
        disk.sync_dir(&dir()).unwrap();
        f.write_all_at(b"-lost", 6).unwrap();
        let g = disk.create(&b).unwrap();
        g.write_all_at(b"no entry", 0).unwrap();
        g.sync_all().unwrap();
        assert_eq!(disk.read(&a).unwrap(), b"synced-lost");
        let after = disk.power_loss(None);
        assert_eq!(after.read(&a).unwrap(), b"synced");
        assert!(after.read(&b).is_err(), "its directory was never synced");
        // A rename not followed by a directory sync is undone.
        disk.rename(&b, &dir().join("snapshot-1.bin")).unwrap();
        assert_eq!(disk.power_loss(None).files().len(), 1);
        disk.sync_dir(&dir()).unwrap();
        assert_eq!(disk.power_loss(None).read(&dir().join("snapshot-1.bin")).unwrap(), b"no entry");
    }

    #[test]
    fn a_torn_write_keeps_whole_sectors_and_a_failed_sync_loses_its_writes_for_good() {
        let disk = SimDisk::new();
        let a = dir().join("wal-1.log");
        let f = disk.create_new(&a).unwrap();
        disk.sync_dir(&dir()).unwrap();
        f.write_all_at(&[7; 1500], 100).unwrap();
        let torn = disk.power_loss(Some(Tear { sector: 512, pick: 1, tail: false })).read(&a).unwrap();
        assert_eq!(torn.len(), 1024, "cut at the second sector boundary inside the write");
        let tail = disk.power_loss(Some(Tear { sector: 512, pick: 1, tail: true })).read(&a).unwrap();
        assert_eq!((tail.len(), tail[1023], tail[1024]), (1600, 0, 7), "only what follows the cut");
        disk.plan(Some(Plan { step: Step::Sync, nth: 1, fault: Fault::Fail }));
        assert!(f.sync_data().is_err());
        assert_eq!(disk.fired().map(|p| p.step), Some(Step::Sync));
        f.sync_data().unwrap();
        assert_eq!(disk.read(&a).unwrap().len(), 1600, "the cache still has it");
        assert!(disk.power_loss(None).read(&a).unwrap().is_empty(), "the disk never will");
        disk.plan(Some(Plan { step: Step::Append, nth: 1, fault: Fault::Crash { done: false } }));
        assert!(f.write_all_at(b"x", 0).is_err());
        assert!(disk.crashed() && f.sync_data().is_err());
    }
}
