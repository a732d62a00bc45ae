//! Tansu's `tansu` command (its `src/bin/tansu.rs`, Apache-2.0), built against the
//! patched tansu-storage: see Cargo.toml.

use tansu_broker::{TracingFormat, otel};
use tansu_cli::{Cli, Result};
use tansu_sans_io::ErrorCode;

#[tokio::main]
async fn main() -> Result<ErrorCode> {
    _ = dotenv::dotenv().ok();
    let _guard = otel::init(TracingFormat::Text)?;
    Cli::main()
        .await
        .inspect(|code| {
            if *code != ErrorCode::None {
                tracing::error!("{code}");
            }
        })
        .inspect_err(|err| tracing::error!("{err}"))
}
