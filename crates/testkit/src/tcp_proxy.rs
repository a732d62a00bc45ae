//! A TCP proxy that can fail the network in two ways: cut it (every connection reset,
//! new ones refused: "Kafka unavailable for a while") or black-hole it (nothing
//! forwarded, nothing closed, new connections accepted and never answered: a firewall
//! that drops packets, a dead NAT entry). The broker advertises the proxy's address, so
//! every client connection goes through it.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Up,
    /// Connections reset, new ones closed at once.
    Down,
    /// Nothing forwarded either way; connections stay open, new ones are held.
    BlackHole,
}

#[derive(Default)]
struct State {
    connections: Vec<AbortHandle>,
}

pub struct TcpProxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on `port` (0: any free port) and forwards to 127.0.0.1:`upstream`.
    pub async fn start(port: u16, upstream: u16) -> TcpProxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind tcp proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let (mode, _) = watch::channel(Mode::Up);
        let st = state.clone();
        let modes = mode.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut watch = modes.subscribe();
                let now = *watch.borrow_and_update();
                let conn = match now {
                    Mode::Down => {
                        drop(inbound);
                        continue;
                    }
                    // Accepted, then held: the client's connect succeeds and its first
                    // request is never answered.
                    Mode::BlackHole => tokio::spawn(async move {
                        let _held = inbound;
                        let _ = watch.wait_for(|m| *m != Mode::BlackHole).await;
                    }),
                    Mode::Up => tokio::spawn(async move {
                        if let Ok(outbound) = TcpStream::connect(("127.0.0.1", upstream)).await {
                            forward(inbound, outbound, watch).await;
                        }
                    }),
                };
                let mut s = st.lock().unwrap();
                s.connections.retain(|c| !c.is_finished());
                s.connections.push(conn.abort_handle());
            }
        });
        TcpProxy {
            port,
            mode,
            state,
            task,
        }
    }

    /// Cuts every connection and refuses new ones until [`up`](Self::up).
    pub fn down(&self) {
        self.mode.send_replace(Mode::Down);
        let mut s = self.state.lock().unwrap();
        for c in s.connections.drain(..) {
            c.abort();
        }
    }

    /// Stops forwarding without closing anything, and holds new connections unanswered,
    /// until [`up`](Self::up). Connections held through it are closed then (the path
    /// comes back, their peers gave up on them long ago).
    pub fn black_hole(&self) {
        self.mode.send_replace(Mode::BlackHole);
    }

    pub fn up(&self) {
        self.mode.send_replace(Mode::Up);
    }
}

/// Copies both ways until either side closes; in a black hole stops copying and holds
/// both sockets open until it ends, then closes them.
async fn forward(mut inbound: TcpStream, mut outbound: TcpStream, mut mode: watch::Receiver<Mode>) {
    let (mut in_read, mut in_write) = inbound.split();
    let (mut out_read, mut out_write) = outbound.split();
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    loop {
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                if *mode.borrow_and_update() == Mode::BlackHole {
                    let _ = mode.wait_for(|m| *m != Mode::BlackHole).await;
                    return;
                }
            }
            n = in_read.read(&mut up) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if out_write.write_all(&up[..n]).await.is_err() { return },
            },
            n = out_read.read(&mut down) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if in_write.write_all(&down[..n]).await.is_err() { return },
            },
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.down();
        self.task.abort();
    }
}
