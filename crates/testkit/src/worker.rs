//! The worker under test, as a real process.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::services::free_port;

/// The files a worker runs with: config and tenants, in a temporary folder.
pub struct WorkerConfig {
    pub dir: tempfile::TempDir,
    pub group_id: String,
    pub http_port: u16,
    /// librdkafka's session.timeout.ms: how long a killed member lingers in the group.
    pub session_timeout_ms: u32,
    /// librdkafka's heartbeat.interval.ms (a quarter of the session timeout unless set):
    /// how soon a member hears of a rebalance.
    pub heartbeat_interval_ms: Option<u32>,
    /// Read tenant settings from this topic instead of tenants.json.
    pub tenants_topic: Option<String>,
    bootstrap: String,
    endpoint: String,
    /// Extra `key = value` lines per section.
    extra: std::collections::BTreeMap<&'static str, Vec<String>>,
}

impl WorkerConfig {
    /// A config for `bootstrap` and AWS `endpoint` with a fresh group ID (members of a
    /// killed process linger in a group until their session times out).
    pub fn new(bootstrap: &str, endpoint: &str) -> WorkerConfig {
        WorkerConfig {
            dir: tempfile::tempdir().expect("temp dir"),
            group_id: format!("kd-test-{}", free_port()),
            http_port: free_port(),
            session_timeout_ms: 6000,
            heartbeat_interval_ms: None,
            tenants_topic: None,
            bootstrap: bootstrap.into(),
            endpoint: endpoint.into(),
            extra: Default::default(),
        }
    }

    /// Adds `key = value` (TOML) to `section` (`kafka.librdkafka`, `aws`, `delivery`).
    pub fn set(mut self, section: &'static str, line: &str) -> Self {
        self.extra.entry(section).or_default().push(line.to_owned());
        self
    }

    fn extra(&self, section: &str) -> String {
        self.extra
            .get(section)
            .map(|lines| lines.join("\n"))
            .unwrap_or_default()
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn tenants_path(&self) -> PathBuf {
        self.dir.path().join("tenants.json")
    }

    /// Writes the tenants file (atomically, as an operator's deploy would).
    pub fn write_tenants(&self, tenants: &[Value]) {
        self.write_tenants_raw(&serde_json::to_string_pretty(tenants).expect("json"));
    }

    pub fn write_tenants_raw(&self, text: &str) {
        let tmp = self.dir.path().join("tenants.json.tmp");
        std::fs::write(&tmp, text).expect("write tenants");
        std::fs::rename(&tmp, self.tenants_path()).expect("replace tenants");
    }

    /// Writes config.toml.
    pub fn write(&self) {
        let text = format!(
            r#"[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
topics = ["segment-events"]
dead_letter_topic = "segment-events-dlq"
[kafka.librdkafka]
"session.timeout.ms" = "{session}"
"heartbeat.interval.ms" = "{heartbeat}"
"statistics.interval.ms" = "1000"
{librdkafka}

[tenants]
{tenants_source}
poll_interval_ms = 200

[aws]
endpoint_url = "{endpoint}"
{aws}

[http]
listen = "127.0.0.1:{port}"

[delivery]
commit_interval_ms = 200
{delivery}
"#,
            bootstrap = self.bootstrap,
            group = self.group_id,
            endpoint = self.endpoint,
            port = self.http_port,
            session = self.session_timeout_ms,
            tenants_source = match &self.tenants_topic {
                Some(t) => format!("topic = \"{t}\""),
                None => "file = \"tenants.json\"".to_owned(),
            },
            heartbeat = self
                .heartbeat_interval_ms
                .unwrap_or((self.session_timeout_ms / 4).max(100)),
            librdkafka = self.extra("kafka.librdkafka"),
            aws = self.extra("aws"),
            delivery = self.extra("delivery"),
        );
        let mut text = text;
        for (section, lines) in &self.extra {
            if !["kafka.librdkafka", "aws", "delivery"].contains(section) {
                text.push_str(&format!("\n[{section}]\n{}\n", lines.join("\n")));
            }
        }
        std::fs::write(self.path(), text).expect("write config");
    }
}

/// A running `kinesis-destination run`.
pub struct Worker {
    child: Child,
    pub http_port: u16,
    log: PathBuf,
}

impl Worker {
    /// Starts `bin run --config …` with test AWS credentials; logs go to a file. Each
    /// worker gets its own HTTP port (through the environment override of
    /// `http.listen`), so several can run from one config.
    pub fn start(bin: &Path, config: &WorkerConfig) -> Worker {
        Worker::start_with_env(bin, config, &[])
    }

    /// [`start`](Self::start) with more environment variables (configuration overrides).
    pub fn start_with_env(bin: &Path, config: &WorkerConfig, env: &[(&str, &str)]) -> Worker {
        Worker::start_under(&[], bin, config, env)
    }

    /// [`start_with_env`](Self::start_with_env) under a wrapper command (`valgrind
    /// --tool=callgrind …`), which runs `bin run --config …` as its own arguments. With a
    /// wrapper that keeps the process (valgrind), [`pid`](Self::pid), CPU time, memory
    /// and signals are the worker's; with one that starts it as a child (heaptrack's
    /// script), they are the wrapper's.
    pub fn start_under(
        wrapper: &[&str],
        bin: &Path,
        config: &WorkerConfig,
        env: &[(&str, &str)],
    ) -> Worker {
        let http_port = free_port();
        let log = config
            .dir
            .path()
            .join(format!("worker-{}.log", free_port()));
        let out = std::fs::File::create(&log).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = command
            .args(["run", "--config"])
            .arg(config.path())
            .env("AWS_ACCESS_KEY_ID", "worker")
            .env("AWS_SECRET_ACCESS_KEY", "worker")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env(
                "KINESIS_DESTINATION__HTTP__LISTEN",
                format!("127.0.0.1:{http_port}"),
            )
            .env(
                "RUST_LOG",
                // KD_WORKER_LOG widens a test's worker logs while debugging.
                std::env::var("KD_WORKER_LOG")
                    .unwrap_or_else(|_| "info,kd_pipeline=debug,kd_aws=debug".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("start worker");
        Worker {
            child,
            http_port,
            log,
        }
    }

    /// Starts a worker and waits (up to 30 s) until it is ready.
    pub fn start_ready(bin: &Path, config: &WorkerConfig) -> Worker {
        let mut worker = Worker::start(bin, config);
        worker.wait_ready(Duration::from_secs(30));
        worker
    }

    /// Waits for `/readyz` to answer 200.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some((200, _)) = self.get("/readyz") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("worker exited ({status}) before ready:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("worker not ready within {timeout:?}:\n{}", self.logs());
    }

    /// `GET path` on the worker's HTTP port: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port, path)
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics(), name)
    }

    /// Resident memory of the worker process, in bytes (Linux).
    pub fn rss_bytes(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// The most resident memory the worker process has had, in bytes (Linux).
    pub fn peak_rss_bytes(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// The worker's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time (user and system) the worker process has used, in seconds (Linux).
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(self.child.id())
    }

    fn status_bytes(&self, field: &str) -> u64 {
        status_bytes_of(self.child.id(), field)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Kills the worker outright (no drain, no commit) and reaps it.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then asserts a clean exit (code 0) within 30 s.
    pub fn stop(&mut self) {
        self.sigterm();
        self.assert_exits_cleanly(Duration::from_secs(30));
    }

    /// Asserts the process exits with code 0 within `timeout` (after a SIGTERM).
    pub fn assert_exits_cleanly(&mut self, timeout: Duration) {
        let status = self.wait_exit(timeout);
        assert!(
            status.success(),
            "worker exited with {status}:\n{}",
            self.logs()
        );
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                panic!("worker did not exit within {timeout:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on `127.0.0.1:port` over HTTP/1.0: (status, body), `None` when nothing
/// answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Runs `bin produce` (the sample-event command, batching as librdkafka does by
/// default) and asserts it succeeded. `extra` adds flags (`--compression zstd`).
pub fn produce(
    bin: &Path,
    bootstrap: &str,
    topic: &str,
    sources: &str,
    count: u32,
    users: u32,
    extra: &[&str],
) {
    let status = Command::new(bin)
        .args(["produce", "--topic", topic, "--sources", sources])
        .args(["--count", &count.to_string(), "--users", &users.to_string()])
        .args(["--bootstrap-servers", bootstrap])
        .args(extra)
        .status()
        .expect("produce runs");
    assert!(status.success(), "produce failed: {status}");
}

/// When a worker held which partitions, from its JSON log (`[log] format = "json"`), up
/// to its revoke or to the point where it stops reading and writing to leave the group:
/// (partition, assigned at, revoked at) with times in seconds since the epoch; `None`
/// when it still held the partition when the log ends.
pub fn ownership(log: &str) -> Vec<(i32, f64, Option<f64>)> {
    let mut open: std::collections::HashMap<i32, f64> = Default::default();
    let mut out = Vec::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let message = v["fields"]["message"].as_str().unwrap_or_default();
        let assigned = message == "partitions assigned";
        let leaving = message == "leaving the consumer group";
        if !assigned && !leaving && message != "partitions revoked" {
            continue;
        }
        let Some(at) = v["timestamp"]
            .as_str()
            .and_then(|t| {
                aws_smithy_types::DateTime::from_str(
                    t,
                    aws_smithy_types::date_time::Format::DateTime,
                )
                .ok()
            })
            .map(|t| t.as_secs_f64())
        else {
            continue;
        };
        // Past this line the worker reads and writes nothing: its partitions are free.
        if leaving {
            for (p, start) in open.drain() {
                out.push((p, start, Some(at)));
            }
            continue;
        }
        // The field is the Debug form of [("topic", 0), ("topic", 1)].
        let partitions: Vec<i32> = v["fields"]["partitions"]
            .as_str()
            .unwrap_or_default()
            .split("\", ")
            .skip(1)
            .filter_map(|rest| rest.split(')').next()?.trim().parse().ok())
            .collect();
        for p in partitions {
            if assigned {
                open.insert(p, at);
            } else if let Some(start) = open.remove(&p) {
                out.push((p, start, Some(at)));
            }
        }
    }
    out.extend(open.into_iter().map(|(p, start)| (p, start, None)));
    out
}

/// The value of one sample in Prometheus text (`name` with its labels as printed, or
/// the bare name); 0 when absent.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

/// CPU time (user and system) process `pid` has used, in seconds (Linux).
pub fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses: utime and
    // stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / per_second
}

/// The most resident memory process `pid` has had, in bytes (Linux).
pub fn peak_rss_of(pid: u32) -> u64 {
    status_bytes_of(pid, "VmHWM:")
}

fn status_bytes_of(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}
