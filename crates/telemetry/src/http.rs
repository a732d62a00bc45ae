//! The HTTP port: `/metrics`, `/healthz` and `/readyz` (and the routes other crates add).
//!
//! Whoever reaches the port can open connections to it, and the liveness probe restarts
//! the pod when `/healthz` does not answer within a second. So no client can keep the
//! probes from answering:
//! - connections are accepted as fast as they arrive, never queued behind busy ones;
//! - one address holds at most [`PER_ADDRESS`] connections: a new one closes that
//!   address's longest idle connection (or is closed, when all are answering);
//! - a connection must send each request head within [`HEAD_TIMEOUT`] (so one idle
//!   between requests is closed then too), and lives at most [`CONNECTION_TIMEOUT`];
//! - at [`MAX_CONNECTIONS`], the connection open the longest without a request in
//!   progress (else the one open the longest) is closed to make room; past
//!   [`HARD_LIMIT`] (closed ones not gone yet) a newcomer is refused. A probe sends its
//!   request as soon as it connects, so it is never the one closed: hundreds of
//!   connections would have to arrive in the millisecond before its request is read.
//!
//! IPv6 addresses count by their /64 (a host usually holds a whole /64).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::oneshot;

use crate::{metrics, Readiness};

/// Connections open at once from which the longest idle one is closed for a newcomer.
const MAX_CONNECTIONS: usize = 256;
/// Connections being closed for newcomers may still hold their sockets for a moment:
/// past this many open, a newcomer is refused (the worker's Kafka and AWS connections
/// share the process's file descriptors).
const HARD_LIMIT: usize = MAX_CONNECTIONS * 2;
/// Most connections open at once from one address (Prometheus and the kubelet need a
/// few each).
const PER_ADDRESS: usize = 16;
/// A connection that has not sent a whole request head this long after connecting, or
/// after its last answer, is closed.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections the kernel holds for the server to accept.
const LISTEN_BACKLOG: u32 = 4096;
/// A connection is closed after this long, whatever it does (scrapers reconnect).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the HTTP listener (so a bad address fails at start-up) and returns the server.
/// `extra` adds routes of other crates (the per-tenant status).
pub async fn bind(
    listen: SocketAddr,
    readiness: Arc<Readiness>,
    extra: Router,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let socket = match listen {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    // A long queue of connections waiting to be accepted (the kernel caps it at
    // net.core.somaxconn): under a flood of connections, a probe's SYN waits in it
    // instead of being dropped and sent again a second later.
    let listener = socket.listen(LISTEN_BACKLOG)?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(readiness)
        .merge(extra);
    Ok(serve(listener, app))
}

/// The open connections: by when they were accepted (their ID grows), and by address.
#[derive(Default)]
struct Connections {
    open: BTreeMap<u64, Open>,
    by_address: HashMap<IpAddr, usize>,
    next_id: u64,
}

struct Open {
    /// Closes the connection when sent or dropped.
    close: Option<oneshot::Sender<()>>,
    /// A request is being answered.
    busy: bool,
    /// Its task has run: a connection accepted but not yet served (its task waiting for
    /// a thread, on a loaded machine) is never the one closed, as its request may be
    /// there already.
    started: bool,
    address: IpAddr,
}

type Table = Arc<Mutex<Connections>>;

fn lock(table: &Table) -> std::sync::MutexGuard<'_, Connections> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connections {
    /// Takes a place for a connection from `address`: its ID and what closes it, or
    /// `None` when the address holds its share and every one of them is answering.
    fn admit(&mut self, address: IpAddr) -> Option<(u64, oneshot::Receiver<()>)> {
        if self.open.len() >= HARD_LIMIT {
            metrics()
                .http_connections_closed
                .with_label_values(&["over_limit"])
                .inc();
            return None;
        }
        let held = self.by_address.entry(address).or_default();
        if *held >= PER_ADDRESS {
            // The address's longest idle connection makes room (a probe may share its
            // address with the clients that hold it); with none idle, the newcomer waits
            // its turn elsewhere.
            // Its longest idle one that was served already, else its longest idle one:
            // the address's own newer connections are the ones flooding it.
            let of_address = |c: &Open| c.address == address && !c.busy && c.close.is_some();
            let idle = self
                .open
                .iter()
                .find(|(_, c)| of_address(c) && c.started)
                .or_else(|| self.open.iter().find(|(_, c)| of_address(c)))
                .map(|(id, _)| *id);
            let Some(idle) = idle else {
                metrics()
                    .http_connections_closed
                    .with_label_values(&["per_address"])
                    .inc();
                return None;
            };
            self.close(idle, "per_address");
        }
        *self.by_address.entry(address).or_default() += 1;
        if self.open.len() >= MAX_CONNECTIONS {
            // Not one already closing whose task has not ended yet.
            let mut closable = self
                .open
                .iter()
                .filter(|(_, c)| c.close.is_some() && c.started);
            let oldest = closable
                .clone()
                .find(|(_, c)| !c.busy)
                .or_else(|| closable.next())
                .map(|(id, _)| *id);
            if let Some(oldest) = oldest {
                self.close(oldest, "evicted");
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let (close, closed) = oneshot::channel();
        self.open.insert(
            id,
            Open {
                close: Some(close),
                busy: false,
                started: false,
                address,
            },
        );
        Some((id, closed))
    }

    /// Closes connection `id`: its task ends it and gives its place back.
    fn close(&mut self, id: u64, reason: &str) {
        if let Some(c) = self.open.get_mut(&id) {
            c.close.take();
            metrics()
                .http_connections_closed
                .with_label_values(&[reason])
                .inc();
        }
    }

    fn set_busy(&mut self, id: u64, busy: bool) {
        if let Some(c) = self.open.get_mut(&id) {
            c.busy = busy;
        }
    }

    fn set_started(&mut self, id: u64) {
        if let Some(c) = self.open.get_mut(&id) {
            c.started = true;
        }
    }
}

/// A connection's place, given back however its task ends.
struct Place {
    table: Table,
    id: u64,
    address: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        t.open.remove(&self.id);
        if let Some(held) = t.by_address.get_mut(&self.address) {
            *held -= 1;
            if *held == 0 {
                t.by_address.remove(&self.address);
            }
        }
    }
}

/// A request being answered: its connection is busy until the answer is made.
struct Busy {
    table: Table,
    id: u64,
}

impl Busy {
    fn new(table: &Table, id: u64) -> Busy {
        lock(table).set_busy(id, true);
        Busy {
            table: table.clone(),
            id,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        lock(&self.table).set_busy(self.id, false);
    }
}

async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    let table = Table::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let address = counted_as(peer.ip());
        let Some((id, closed)) = lock(&table).admit(address) else {
            drop(stream);
            continue;
        };
        let place = Place {
            table: table.clone(),
            id,
            address,
        };
        let inner = hyper_util::service::TowerToHyperService::new(app.clone());
        let requests = table.clone();
        let service = hyper::service::service_fn(move |request| {
            let busy = Busy::new(&requests, id);
            let answer = hyper::service::Service::call(&inner, request);
            async move {
                let answer = answer.await;
                drop(busy);
                answer
            }
        });
        tokio::spawn(async move {
            lock(&place.table).set_started(id);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection) => {}
                _ = closed => {}
            }
            drop(place);
        });
    }
}

/// The address a connection counts against: an IPv6 address's /64.
fn counted_as(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
        v4 => v4,
    }
}

async fn render_metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics().render(),
    )
}

/// 200, or 503 naming the failing parts: any caller may read it, so it carries no
/// error text (see [`Readiness::public_reason`]).
async fn ready(State(r): State<Arc<Readiness>>) -> impl IntoResponse {
    match r.public_reason() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_its_share_and_the_longest_idle_connection_makes_room() {
        let mut t = Connections::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mut kept = Vec::new();
        for _ in 0..PER_ADDRESS {
            let admitted = t.admit(a).expect("within the address's share");
            t.set_started(admitted.0);
            kept.push(admitted);
        }
        for (id, _) in &kept {
            t.set_busy(*id, true);
        }
        assert!(
            t.admit(a).is_none(),
            "over the address's share, all answering"
        );
        t.set_busy(kept[3].0, false);
        let probe = t
            .admit(a)
            .expect("room made by the address's idle connection");
        assert!(
            t.open[&kept[3].0].close.is_none(),
            "closed for the newcomer"
        );
        drop(t.open.remove(&kept[3].0));
        drop(t.open.remove(&probe.0));
        *t.by_address.get_mut(&a).unwrap() -= 2;
        for (id, _) in &kept {
            t.set_busy(*id, false);
        }
        // Fill the table from other addresses; a's first connection is answering a request.
        let mut others = Vec::new();
        for i in 0..(MAX_CONNECTIONS - t.open.len()) {
            let b = IpAddr::from([10, 1, (i / 200) as u8, (i % 200) as u8]);
            let admitted = t.admit(b).unwrap();
            t.set_started(admitted.0);
            others.push(admitted);
        }
        let ids: Vec<u64> = kept.iter().map(|(id, _)| *id).collect();
        t.set_busy(ids[0], true);
        // Full: the next one closes the longest-open idle connection (a's second).
        let newcomer = t.admit("10.9.9.9".parse().unwrap()).unwrap();
        t.set_started(newcomer.0);
        assert!(t.open[&ids[1]].close.is_none(), "evicted");
        assert!(t.open[&ids[0]].close.is_some(), "busy: kept");
        assert!(t.open[&newcomer.0].close.is_some());
        assert_eq!(
            kept[1].1.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "its task sees the close"
        );
        assert_eq!(
            kept[2].1.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        // The next one closes the next idle connection, not the one closing already,
        // nor one accepted but not served yet.
        let unserved = t.admit("10.9.9.8".parse().unwrap()).unwrap();
        assert!(t.open[&ids[2]].close.is_none(), "the next evicted");
        t.admit("10.9.9.6".parse().unwrap()).unwrap();
        assert!(t.open[&unserved.0].close.is_some(), "not served yet: kept");
        assert!(
            t.open[&ids[4]].close.is_none(),
            "the one after (the fourth was removed)"
        );
        // Closed ones whose tasks have not ended count: past the hard limit, newcomers
        // are refused.
        let mut i = 0u32;
        while t.open.len() < HARD_LIMIT {
            i += 1;
            t.admit(IpAddr::from([10, 2, (i / 200) as u8, (i % 200) as u8]))
                .unwrap();
        }
        assert!(t.admit("10.9.9.7".parse().unwrap()).is_none());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let a = counted_as("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = counted_as("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = counted_as("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            counted_as("::ffff:10.0.0.1".parse().unwrap()),
            IpAddr::from([10, 0, 0, 1])
        );
    }
}
