//! Why a server did not start, or stopped: the error [`crate::serve::serve`] and
//! [`crate::serve::run`] return, one variant per thing the operator fixes differently (a setting,
//! a file, the address, the data directory, the fronted store). Errors a running server answers
//! to its clients are not here: they are [`distlock::ErrorCode`]s in JSON bodies.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::wal::WalError;

/// Why a server did not start, or stopped. Its message names the setting or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting out of range, or a store the server refuses (`memory://`): fix the settings.
    #[error("{0}")]
    Settings(String),
    /// A token file or a TLS file that cannot be read, or does not hold what it must (the message
    /// names the file, and the line where it can).
    #[error("{0}")]
    File(String),
    /// The listen address cannot be bound (in use, not an address of this host, no permission).
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The embedded store cannot be opened: another server has its directory, or a file there
    /// cannot be read or is corrupt.
    #[error("opening the embedded store in {}: {source}", dir.display())]
    Store {
        /// The data directory.
        dir: PathBuf,
        /// The cause.
        source: WalError,
    },
    /// The `--store` URL cannot be opened (not a URL distlock knows, a bad parameter).
    #[error("opening store {url}: {source}")]
    Backend {
        /// The URL, its password redacted.
        url: String,
        /// The cause.
        source: distlock::Error,
    },
    /// The process-wide metrics recorder could not be installed.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The listener failed while serving.
    #[error("serving: {0}")]
    Serving(std::io::Error),
}

/// A result with the server's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
