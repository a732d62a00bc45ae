//! Whether the consumer can read at all. librdkafka says when every broker is down
//! (connections refused or reset), but not when a network path drops packets without
//! closing anything: then requests wait out `socket.timeout.ms` (60 s) one after
//! another while every connection still looks up. The statistics (every 5 s) say how
//! long ago each broker last sent anything; a consumer that fetches or heartbeats (every
//! 3 s, over the coordinator's connection) hears from some broker well within
//! [`ANSWER_WITHIN`]. With no broker up and
//! answering, `/readyz` says so, and a warning is logged once a minute until one is.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kd_telemetry::{Problem, Readiness};
use rdkafka::statistics::Statistics;

/// A broker that has sent nothing for this long is not answering.
pub(crate) const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// What a statistics report says of the cluster's brokers: those learned from metadata
/// and the group coordinator's connection (heartbeats and commits go there, so a
/// member with no partition to fetch still hears from it); bootstrap entries and
/// librdkafka's internal broker aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Brokers {
    /// Connected (librdkafka's state `UP`).
    pub connected: usize,
    /// Connected and have sent something within [`ANSWER_WITHIN`].
    pub answering: usize,
}

pub(crate) fn brokers(stats: &Statistics) -> Brokers {
    let within = ANSWER_WITHIN.as_micros() as i64;
    let up = || {
        stats
            .brokers
            .values()
            .filter(|b| !matches!(b.source.as_str(), "configured" | "internal") && b.state == "UP")
    };
    Brokers {
        connected: up().count(),
        answering: up().filter(|b| (0..=within).contains(&b.rxidle)).count(),
    }
}

/// Turns the consumer's view of its brokers into readiness, a gauge and log lines.
pub(crate) struct BrokerHealth {
    readiness: Arc<Readiness>,
    /// Since when nothing could be read, and when that was last logged.
    unreachable: Mutex<Option<Unreachable>>,
}

struct Unreachable {
    since: Instant,
    logged_at: Instant,
}

const LOG_EVERY: Duration = Duration::from_secs(60);

impl BrokerHealth {
    pub(crate) fn new(readiness: Arc<Readiness>) -> BrokerHealth {
        BrokerHealth {
            readiness,
            unreachable: Mutex::new(None),
        }
    }

    /// librdkafka reported every broker down.
    pub(crate) fn all_brokers_down(&self) {
        self.cannot_read("no Kafka broker can be reached");
    }

    /// A statistics report (see [`brokers`]).
    pub(crate) fn observed(&self, brokers: Brokers) {
        kd_telemetry::metrics()
            .kafka_brokers_answering
            .set(brokers.answering as i64);
        if brokers.answering > 0 {
            let was = self
                .unreachable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(was) = was {
                self.readiness.set_problem(Problem::Kafka, None);
                tracing::info!(
                    after_secs = was.since.elapsed().as_secs(),
                    brokers = brokers.answering,
                    "kafka brokers answer again"
                );
            }
        } else if brokers.connected == 0 {
            self.cannot_read("no Kafka broker is connected");
        } else {
            self.cannot_read(&format!(
                "no Kafka broker has answered for {} s",
                ANSWER_WITHIN.as_secs()
            ));
        }
    }

    fn cannot_read(&self, why: &str) {
        let now = Instant::now();
        let mut unreachable = self.unreachable.lock().unwrap_or_else(|p| p.into_inner());
        let log = match unreachable.as_mut() {
            None => {
                *unreachable = Some(Unreachable {
                    since: now,
                    logged_at: now,
                });
                Some(0)
            }
            Some(u) if now.duration_since(u.logged_at) >= LOG_EVERY => {
                u.logged_at = now;
                Some(now.duration_since(u.since).as_secs())
            }
            Some(_) => None,
        };
        drop(unreachable);
        self.readiness
            .set_problem(Problem::Kafka, Some(format!("kafka: {why}")));
        if let Some(for_secs) = log {
            tracing::warn!(for_secs, "{why}: nothing can be read");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(brokers: &[(&str, &str, i64)]) -> Statistics {
        let brokers: serde_json::Map<String, serde_json::Value> = brokers
            .iter()
            .enumerate()
            .map(|(i, (source, state, rxidle))| {
                (
                    format!("b{i}"),
                    serde_json::json!({"name": format!("b{i}"), "nodeid": 1,
                        "nodename": "", "source": source, "state": state, "stateage": 0,
                        "outbuf_cnt": 0, "outbuf_msg_cnt": 0, "waitresp_cnt": 0,
                        "waitresp_msg_cnt": 0, "tx": 0, "txbytes": 0, "txerrs": 0,
                        "txretries": 0, "req_timeouts": 0, "rx": 0, "rxbytes": 0,
                        "rxerrs": 0, "rxcorriderrs": 0, "rxpartial": 0, "zbuf_grow": 0,
                        "buf_grow": 0, "wakeups": 0, "connects": 0, "disconnects": 0,
                        "txidle": 0, "rxidle": rxidle, "req": {}, "toppars": {}}),
                )
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "name": "c", "client_id": "c", "type": "consumer", "ts": 0, "time": 0,
            "age": 0, "replyq": 0, "msg_cnt": 0, "msg_size": 0, "msg_max": 0,
            "msg_size_max": 0, "simple_cnt": 0, "metadata_cache_cnt": 0, "tx": 0,
            "tx_bytes": 0, "rx": 0, "rx_bytes": 0, "txmsgs": 0, "txmsg_bytes": 0,
            "rxmsgs": 0, "rxmsg_bytes": 0, "brokers": brokers, "topics": {}
        }))
        .expect("statistics JSON as librdkafka emits it")
    }

    #[test]
    fn only_connected_brokers_heard_from_lately_answer() {
        let s = stats(&[
            ("learned", "UP", 200_000),
            // Connected, silent for 31 s: a black hole.
            ("learned", "UP", 31_000_000),
            ("learned", "DOWN", 1_000),
            // Connected, never received.
            ("learned", "UP", -1),
            // The bootstrap entry for broker 1, and librdkafka's internal broker.
            ("configured", "UP", 1_000),
            ("internal", "UP", 1_000),
        ]);
        assert_eq!(
            brokers(&s),
            Brokers {
                connected: 3,
                answering: 1
            }
        );
        // The group coordinator's connection counts: a member with nothing to fetch
        // hears from it at every heartbeat.
        assert_eq!(
            brokers(&stats(&[("logical", "UP", 2_000_000)])).answering,
            1
        );
        assert_eq!(
            brokers(&stats(&[
                ("learned", "UP", 31_000_000),
                ("learned", "CONNECT", 0)
            ])),
            Brokers {
                connected: 1,
                answering: 0
            }
        );
    }

    #[test]
    fn readiness_follows_the_brokers() {
        let readiness = Arc::new(Readiness::default());
        readiness.set_tenants_loaded();
        readiness.set_joined_group();
        let health = BrokerHealth::new(readiness.clone());
        let seen = |connected, answering| Brokers {
            connected,
            answering,
        };
        health.observed(seen(1, 1));
        assert!(readiness.is_ready());
        health.all_brokers_down();
        assert!(!readiness.is_ready());
        // Still none: still not ready.
        health.observed(seen(0, 0));
        assert!(!readiness.is_ready());
        assert!(readiness
            .reason()
            .unwrap()
            .contains("no Kafka broker is connected"));
        health.observed(seen(2, 2));
        assert!(readiness.is_ready());
        // Connected and silent.
        health.observed(seen(1, 0));
        assert!(!readiness.is_ready());
        assert!(readiness.reason().unwrap().contains("has answered"));
    }
}
