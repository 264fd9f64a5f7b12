//! The `distlock` command, apart from its argument parsing (`args.rs`, `main.rs`): what each subcommand does
//! and prints. The lock server itself is the `distlock-server` crate; `distlock serve` only
//! parses its flags and calls [`distlock_server::serve::run`].
//!
//! # Layout
//! - [`cli`]: the client subcommands, their output (text or `--json`) and exit codes.
//! - [`run`]: `distlock run`; [`child`]: the command `run` starts and how all of it is stopped.
//! - [`bench`](mod@bench): `distlock bench`, load generation with HDR histograms and checks; also
//!   used by `benches/backends.rs`.

pub mod bench;
pub mod child;
pub mod cli;
pub mod run;
