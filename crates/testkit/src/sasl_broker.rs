//! Just enough of a Kafka broker to see what a client authenticates with over
//! SASL/OAUTHBEARER: it answers `ApiVersions`, `SaslHandshake` and `SaslAuthenticate`
//! (accepting every token), records each token, then closes the connection. No test
//! broker here speaks SASL/OAUTHBEARER the way Amazon MSK does (MSK checks the token's
//! SigV4 signature against IAM), so the tests check the recorded tokens' signatures
//! themselves.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const API_VERSIONS: i16 = 18;
const SASL_HANDSHAKE: i16 = 17;
const SASL_AUTHENTICATE: i16 = 36;
const METADATA: i16 = 3;
const UNSUPPORTED_VERSION: i16 = 35;

/// A listening fake broker and the tokens clients sent it.
pub struct SaslBroker {
    pub port: u16,
    tokens: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SaslBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SaslBroker {
    pub async fn start() -> SaslBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let seen = tokens.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, seen).await;
                });
            }
        });
        SaslBroker { port, tokens, task }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The OAUTHBEARER tokens received so far.
    pub fn tokens(&self) -> Vec<String> {
        self.tokens.lock().unwrap().clone()
    }
}

/// Reads requests and answers them until the client has authenticated.
async fn serve(mut stream: TcpStream, tokens: Arc<Mutex<Vec<String>>>) -> std::io::Result<()> {
    loop {
        let len = stream.read_i32().await? as usize;
        let mut req = vec![0u8; len];
        stream.read_exact(&mut req).await?;
        let mut r = Reader(&req);
        let api_key = r.i16();
        let api_version = r.i16();
        let correlation = r.i32();
        let _client_id = r.string();
        let mut body = Vec::new();
        match api_key {
            // Anything but v0 is answered as KIP-511 says: UNSUPPORTED_VERSION with the
            // v0 list, and the client asks again in v0.
            API_VERSIONS => {
                let (error, apis): (i16, &[(i16, i16, i16)]) = if api_version > 0 {
                    (UNSUPPORTED_VERSION, &[(API_VERSIONS, 0, 0)])
                } else {
                    (
                        0,
                        &[
                            (API_VERSIONS, 0, 0),
                            (SASL_HANDSHAKE, 1, 1),
                            (SASL_AUTHENTICATE, 0, 0),
                            (METADATA, 0, 1),
                        ],
                    )
                };
                body.extend(error.to_be_bytes());
                body.extend((apis.len() as i32).to_be_bytes());
                for (key, min, max) in apis {
                    body.extend(key.to_be_bytes());
                    body.extend(min.to_be_bytes());
                    body.extend(max.to_be_bytes());
                }
            }
            SASL_HANDSHAKE => {
                body.extend(0i16.to_be_bytes());
                body.extend(1i32.to_be_bytes());
                put_string(&mut body, "OAUTHBEARER");
            }
            SASL_AUTHENTICATE => {
                let auth = r.bytes();
                // RFC 7628: "n,," 0x01 "auth=Bearer " token 0x01 0x01
                let text = String::from_utf8_lossy(auth);
                if let Some(token) = text
                    .split('\u{1}')
                    .find_map(|kv| kv.strip_prefix("auth=Bearer "))
                {
                    tokens.lock().unwrap().push(token.to_owned());
                }
                body.extend(0i16.to_be_bytes());
                body.extend((-1i16).to_be_bytes()); // no error message
                body.extend(0i32.to_be_bytes()); // no auth bytes back
                write_response(&mut stream, correlation, &body).await?;
                // Authenticated: nothing more to see here.
                return Ok(());
            }
            _ => return Ok(()),
        }
        write_response(&mut stream, correlation, &body).await?;
    }
}

async fn write_response(
    stream: &mut TcpStream,
    correlation: i32,
    body: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend(((4 + body.len()) as i32).to_be_bytes());
    out.extend(correlation.to_be_bytes());
    out.extend(body);
    stream.write_all(&out).await
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as i16).to_be_bytes());
    out.extend(s.as_bytes());
}

/// Reads big-endian Kafka primitives (a short request panics the connection's task).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.take(2).try_into().unwrap_or_default())
    }
    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take(4).try_into().unwrap_or_default())
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.i16();
        (len >= 0).then(|| self.take(len as usize))
    }
    fn bytes(&mut self) -> &'a [u8] {
        let len = self.i32().max(0) as usize;
        self.take(len)
    }
}
