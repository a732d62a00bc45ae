//! What every test file of the binary shares (the harness itself is `kd-testkit`).

use std::path::Path;

/// The `kinesis-destination` binary under test (only integration tests of this package
/// know its path, so this cannot live in `kd-testkit`).
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kinesis-destination"))
}

/// Runs `kinesis-destination replay ARGS --config CONFIG` to its end, asserts it
/// succeeded, and returns what it reported (its stderr).
#[allow(dead_code)] // not every test file replays
pub fn replay(args: &[&str], config: &Path) -> String {
    let out = std::process::Command::new(bin())
        .arg("replay")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("replay runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}
