//! The file operations the log uses, as a trait: [`RealDisk`] is `std::fs` (what the server runs
//! on), and the test one, [`super::sim::SimDisk`], keeps files in memory, loses what was not
//! synced when told to crash, and fails chosen steps. The log is generic over the disk, so the
//! server's write path stays statically dispatched: the same calls as before, in the same order.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// An open file of a [`Disk`].
pub trait DiskFile: Send + Sync + 'static {
    /// Writes all of `buf` at `offset` (`pwrite`), growing the file if it ends before.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data durable (`fdatasync`): what an append waits for.
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the file's data and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// The operations on the data directory the log needs. Directory entries (a file created,
/// renamed or removed) are durable only after [`Disk::sync_dir`].
pub trait Disk: Clone + Send + Sync + 'static {
    /// The disk's open file.
    type File: DiskFile;
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates a new file for reading and writing; fails if it exists.
    fn create_new(&self, path: &Path) -> io::Result<Self::File>;
    /// Creates a file, or empties an existing one, for writing.
    fn create(&self, path: &Path) -> io::Result<Self::File>;
    /// Opens an existing file for writing.
    fn open_write(&self, path: &Path) -> io::Result<Self::File>;
    /// Creates segment `path`, `size` bytes: `head`, then zeros; and makes its data durable
    /// (not its directory entry: see [`Disk::sync_dir`]).
    fn preallocate(&self, path: &Path, size: u64, head: &[u8]) -> io::Result<Self::File> {
        let file = self.create_new(path)?;
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < size {
            let chunk = (size - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..chunk], at)?;
            at += chunk as u64;
        }
        file.write_all_at(head, 0)?;
        file.sync_all()?;
        Ok(file)
    }
    /// The whole content of a file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The paths of the files in `dir` (any order).
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Makes the entries of `dir` durable (an `fsync` of the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system (`std::fs`).
#[derive(Debug, Clone, Copy, Default)]
pub struct RealDisk;

impl DiskFile for File {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

impl Disk for RealDisk {
    type File = File;

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn create_new(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).create_new(true).open(path)
    }

    fn create(&self, path: &Path) -> io::Result<File> {
        File::create(path)
    }

    fn open_write(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().write(true).open(path)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        fs::read_dir(dir)?.map(|entry| entry.map(|e| e.path())).collect()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
