//! Real services as child processes on free loopback ports.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port} within 60s");
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A Tansu broker (the build of `tools/tansu`).
///
/// [`Tansu::start`] stores in SQLite, as DESIGN.md asks: that engine answers a fetch from
/// inside a multi-record batch from that offset and reports the right high watermark,
/// for every codec but snappy (it cannot read snappy batches back). Snappy input is
/// tested on [`Tansu::start_memory`], the memory engine with 0.6.0's mid-batch fetch and
/// high-watermark bugs fixed (`tools/tansu/tansu-storage.patch`). `tests/broker.rs`
/// checks both.
pub struct Tansu {
    child: Child,
    pub port: u16,
    /// The port it tells clients to connect to (a proxy in front of it), or `port`.
    advertised_port: u16,
    engine: Engine,
    /// The broker's working directory, holding its database and its log (`tansu.log`),
    /// for its life (and across [`restart`](Tansu::restart)s).
    dir: tempfile::TempDir,
}

/// Where a [`Tansu`] keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    /// `sqlite://tansu.db` in the broker's directory.
    Sqlite,
    /// `memory://`, patched; the one that reads snappy batches back.
    Memory,
}

impl Tansu {
    /// A broker on SQLite.
    pub fn start() -> Tansu {
        Tansu::spawn(free_port(), None, Engine::Sqlite)
    }

    /// A broker on the (patched) memory engine: for snappy-compressed input only.
    pub fn start_memory() -> Tansu {
        Tansu::spawn(free_port(), None, Engine::Memory)
    }

    /// A broker on SQLite, on `port`, that tells clients to connect to `advertised_port`
    /// instead (a [`TcpProxy`](crate::TcpProxy) in front of it), or to `port` itself.
    pub fn start_on(port: u16, advertised_port: Option<u16>) -> Tansu {
        Tansu::spawn(port, advertised_port, Engine::Sqlite)
    }

    /// A broker on `engine`, on `port`, advertising `advertised_port` (or `port`).
    fn spawn(port: u16, advertised_port: Option<u16>, engine: Engine) -> Tansu {
        let dir = tempfile::tempdir().expect("temp dir for the broker");
        let advertised_port = advertised_port.unwrap_or(port);
        let child = Tansu::run(port, advertised_port, engine, dir.path());
        Tansu {
            child,
            port,
            advertised_port,
            engine,
            dir,
        }
    }

    /// Starts the broker process in `dir` and waits until it listens.
    fn run(port: u16, advertised_port: u16, engine: Engine, dir: &std::path::Path) -> Child {
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised_port}");
        let storage = match engine {
            // Relative to the working directory: the temp dir.
            Engine::Sqlite => "sqlite://tansu.db",
            Engine::Memory => "memory://tansu/",
        };
        // Appended to: a restarted broker's log follows the killed one's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tansu.log"))
            .expect("broker log");
        let mut child = Command::new("tansu")
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", storage])
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("broker log"))
            .stderr(log)
            .spawn()
            .expect("tansu is installed (scripts/test.sh installs it)");
        wait_for_port(port, "tansu", &mut child);
        child
    }

    /// Kills the broker with SIGKILL, as a node failure would: no shutdown, open
    /// connections reset by the kernel. Its data directory stays.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the broker again on the same port and data directory (after
    /// [`kill`](Self::kill)); what it had stored (records, committed offsets) is there.
    pub fn restart(&mut self) {
        kill(&mut self.child);
        self.child = Tansu::run(
            self.port,
            self.advertised_port,
            self.engine,
            self.dir.path(),
        );
    }

    /// The broker's log so far (both lives, after a restart).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new("tansu")
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
            ])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create runs");
        assert!(status.success(), "creating topic {name} failed: {status}");
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A moto server: STS and Kinesis on one endpoint.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let mut child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with moto[server] is installed (scripts/test.sh installs it)");
        wait_for_port(port, "moto", &mut child);
        Moto { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}
