//! Shared test harness: the server inside the test process ([`InProcess`]), and the real
//! Redis and etcd processes of the library's tests (`support`). Tests that need the server as a
//! process (kill -9, signals, exit codes) are in `distlock-cli`, which builds the binary.

#![allow(dead_code)]

#[path = "../../../distlock/tests/support/mod.rs"]
pub mod support;

mod in_process;
pub use in_process::InProcess;
