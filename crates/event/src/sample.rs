//! Sample events, as the `produce` command sends them: every Segment type in turn, with
//! the fields a real library fills in.

use serde_json::{json, Value};

use crate::EventType;

/// Which of `users` users the `n`th sample event is of (six events in a row each).
pub fn sample_user(n: u64, users: u64) -> u64 {
    n / 6 % users.max(1)
}

/// The `n`th sample event of `source`, sent at `timestamp` (ISO 8601): types in turn,
/// `users` users in turn, every fifth of them anonymous; `properties.seq` is `n`, and
/// `pad` characters of padding make it larger. With `project_id`, the source is also in
/// the body's `projectId`.
pub fn sample_event(
    source: &str,
    n: u64,
    users: u64,
    project_id: bool,
    pad: usize,
    timestamp: &str,
) -> Value {
    let kind = EventType::ALL[(n % 6) as usize];
    let user = sample_user(n, users);
    let mut e = json!({
        "type": kind.as_str(),
        "messageId": format!("{source}-{n}"),
        "timestamp": timestamp,
        "context": {"library": {"name": "kinesis-destination-produce", "version": env!("CARGO_PKG_VERSION")}},
    });
    if n % 5 == 4 {
        e["anonymousId"] = json!(format!("anon-{user}"));
    } else {
        e["userId"] = json!(format!("user-{user}"));
    }
    match kind {
        EventType::Identify => {
            e["traits"] = json!({"email": format!("user-{user}@example.com"), "plan": "Pro Annual"})
        }
        EventType::Track => {
            e["event"] = json!("User Registered");
            e["properties"] = json!({"plan": "Pro Annual", "account_type": "Facebook"});
        }
        EventType::Page => e["name"] = json!("Home"),
        EventType::Screen => e["name"] = json!("Dashboard"),
        EventType::Group => {
            e["groupId"] = json!("0e8c78ea9d9dsasahjg");
            e["traits"] = json!({"name": "group_name", "employees": 3});
        }
        EventType::Alias => e["previousId"] = json!(format!("anon-{user}")),
    }
    e["properties"]["seq"] = json!(n);
    if pad > 0 {
        e["properties"]["pad"] = json!("x".repeat(pad));
    }
    if project_id {
        e["projectId"] = json!(source);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_cover_every_type_and_both_identities() {
        let events: Vec<_> = (0..30)
            .map(|n| sample_event("src", n, 3, true, 0, "2026-01-01T00:00:00Z"))
            .collect();
        for t in EventType::ALL {
            assert!(events.iter().any(|e| e["type"] == t.as_str()), "{t:?}");
        }
        assert!(events
            .iter()
            .any(|e| e.get("anonymousId").is_some() && e.get("userId").is_none()));
        for e in &events {
            let bytes = e.to_string();
            let view = crate::EventView::decode(bytes.as_bytes()).unwrap();
            assert!(view.partition_key(false).is_ok());
            assert_eq!(view.project_id.as_deref(), Some("src"));
        }
    }
}
