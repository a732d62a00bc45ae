//! What every test file of the binary shares (the harness itself is `kd-testkit`).

use std::path::Path;

/// The `kinesis-destination` binary under test (only integration tests of this package
/// know its path, so this cannot live in `kd-testkit`).
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kinesis-destination"))
}
