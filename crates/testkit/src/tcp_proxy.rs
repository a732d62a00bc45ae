//! A TCP proxy that can cut the network: for "Kafka unavailable for a while". The broker
//! advertises the proxy's address, so every client connection goes through it.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct State {
    down: bool,
    connections: Vec<AbortHandle>,
}

pub struct TcpProxy {
    pub port: u16,
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
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if st.lock().unwrap().down {
                    drop(inbound);
                    continue;
                }
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut s = st.lock().unwrap();
                s.connections.retain(|c| !c.is_finished());
                s.connections.push(conn.abort_handle());
            }
        });
        TcpProxy { port, state, task }
    }

    /// Cuts every connection and refuses new ones until [`up`](Self::up).
    pub fn down(&self) {
        let mut s = self.state.lock().unwrap();
        s.down = true;
        for c in s.connections.drain(..) {
            c.abort();
        }
    }

    pub fn up(&self) {
        self.state.lock().unwrap().down = false;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.down();
        self.task.abort();
    }
}
