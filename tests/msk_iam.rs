//! `kafka.aws_msk_iam`: the worker's Kafka clients authenticate with SASL/OAUTHBEARER
//! tokens signed from its own AWS credentials. Against a fake broker that records the
//! tokens (no test broker speaks MSK's IAM scheme); each token's signature is checked by
//! signing again, and the signer itself is checked against AWS's own in `kd_aws`.

mod common;
use common::bin;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use base64::Engine;
use kd_aws::msk_iam::{auth_token, USER_AGENT};
use kd_testkit::{free_port, SaslBroker};

const ACCESS_KEY: &str = "AKIDMSKIAMTEST";
const SECRET: &str = "msk-iam-test-secret";
const SESSION: &str = "msk-iam-test-session/token+=";

fn write_config(dir: &std::path::Path, bootstrap: &str, extra: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("tenants.json"), "[]").unwrap();
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbootstrap_servers = \"{bootstrap}\"\naws_msk_iam = true\n\
             aws_msk_region = \"eu-central-1\"\n{extra}\n\
             [tenants]\nfile = \"tenants.json\"\nallow_empty = true\n\
             [http]\nlisten = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    )
    .unwrap();
    path
}

fn query(token: &str) -> BTreeMap<String, String> {
    let url = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .expect("URL-safe base64 without padding"),
    )
    .unwrap();
    let (host, query) = url.split_once('?').unwrap();
    assert_eq!(host, "https://kafka.eu-central-1.amazonaws.com/");
    query
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// X-Amz-Date (`20261126T120000Z`) as a time.
fn signed_at(date: &str) -> SystemTime {
    let n = |r: std::ops::Range<usize>| date[r].parse::<u64>().unwrap();
    let (y, m, d) = (n(0..4), n(4..6), n(6..8));
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    UNIX_EPOCH + Duration::from_secs(days * 86_400 + n(9..11) * 3600 + n(11..13) * 60 + n(13..15))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_authenticates_to_kafka_with_tokens_signed_from_its_own_credentials() {
    let broker = SaslBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The fake broker has no TLS: the operator's security.protocol wins over SASL_SSL.
    let config = write_config(
        dir.path(),
        &broker.bootstrap(),
        "[kafka.librdkafka]\n\"security.protocol\" = \"SASL_PLAINTEXT\"",
    );
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_SESSION_TOKEN", SESSION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("worker.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let tokens = loop {
        let t = broker.tokens();
        if !t.is_empty() {
            break t;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "no OAUTHBEARER token reached the broker; the worker said:\n{}",
                std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill();
    let _ = child.wait();

    let credentials = Credentials::new(ACCESS_KEY, SECRET, Some(SESSION.into()), None, "test");
    for token in &tokens {
        let q = query(token);
        assert!(
            q["X-Amz-Credential"].starts_with(&format!("{ACCESS_KEY}%2F")),
            "{q:?}"
        );
        assert!(q["X-Amz-Credential"].ends_with("%2Feu-central-1%2Fkafka-cluster%2Faws4_request"));
        assert_eq!(q["Action"], "kafka-cluster%3AConnect");
        assert_eq!(q["X-Amz-Expires"], "900");
        assert!(q.contains_key("X-Amz-Security-Token"));
        // Signed just now, with these credentials: signing again gives the same.
        let at = signed_at(&q["X-Amz-Date"]);
        let age = SystemTime::now().duration_since(at).unwrap_or_default();
        assert!(age < Duration::from_secs(120), "signed {age:?} ago");
        let again = auth_token(&credentials, "eu-central-1", at, USER_AGENT).unwrap();
        assert_eq!(query(&again.token), q, "the signature checks out");
    }
}

#[test]
fn msk_iam_with_a_protocol_that_is_not_sasl_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "127.0.0.1:9",
        "[kafka.librdkafka]\n\"security.protocol\" = \"ssl\"",
    );
    let out = Command::new(bin())
        .args(["run", "--check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("security.protocol") && err.contains("aws_msk_iam"),
        "{err}"
    );
}

#[test]
fn msk_iam_without_a_region_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:9", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("aws_msk_region = \"eu-central-1\"\n", "");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kafka.aws_msk_region"), "{err}");
}

/// librdkafka asks again at 80% of a token's life, through the refresh event that the
/// clients' contexts answer: a producer (whose polling thread serves events) with
/// 3-second tokens sends a new one within seconds. (The worker's consumer is polled only
/// once it reads, which the fake broker never lets it do; its first token is set
/// directly, see the test above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_asked_for_again_before_they_expire() {
    use kd_kafka::auth::{AuthContext, KafkaAuth};
    use rdkafka::producer::{FutureProducer, Producer};
    use std::sync::Arc;

    let broker = SaslBroker::start().await;
    // When each token was made.
    let made: Arc<std::sync::Mutex<Vec<std::time::Instant>>> = Arc::default();
    let log = made.clone();
    let auth = KafkaAuth::oauthbearer(Arc::new(move || {
        let mut log = log.lock().unwrap();
        log.push(std::time::Instant::now());
        Ok((
            format!("token-{}", log.len() - 1),
            SystemTime::now() + Duration::from_secs(3),
        ))
    }));
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", broker.bootstrap());
    auth.configure(&mut config, &Default::default());
    config.set("security.protocol", "SASL_PLAINTEXT");
    // The fake broker closes each connection once authenticated: reconnect (and so
    // show the current token) every half second at most.
    config.set("reconnect.backoff.max.ms", "500");
    let producer: FutureProducer<AuthContext> = config
        .create_with_context(AuthContext(auth.clone()))
        .unwrap();
    kd_kafka::auth::set_token_now(producer.client(), &auth);
    let first = made.lock().unwrap()[0];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // A token made 2 s or more after the first (asked for because the first was
        // at 80% of its 3-second life, not at start-up) on the wire.
        let late_enough: Vec<String> = made
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, at)| at.duration_since(first) >= Duration::from_secs(2))
            .map(|(n, _)| format!("token-{n}"))
            .collect();
        if broker.tokens().iter().any(|t| late_enough.contains(t)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no token asked for again and sent in 30 s: {:?}",
            broker.tokens()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
