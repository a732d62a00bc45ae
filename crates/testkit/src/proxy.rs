//! A recording HTTP proxy in front of the AWS emulator: forwards every request as it is
//! and records the STS AssumeRole calls it sees.

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// One AssumeRole request as the worker sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRoleCall {
    pub role_arn: String,
    pub external_id: Option<String>,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    calls: Arc<Mutex<Vec<AssumeRoleCall>>>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

pub struct RecordingProxy {
    pub port: u16,
    calls: Arc<Mutex<Vec<AssumeRoleCall>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingProxy {
    /// Starts the proxy in front of `upstream` (for example `http://127.0.0.1:5000`).
    pub async fn start(upstream: &str) -> RecordingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let state = ProxyState {
            upstream: upstream.trim_end_matches('/').to_owned(),
            calls: calls.clone(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        let app = axum::Router::new().fallback(forward).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        RecordingProxy { port, calls, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The AssumeRole calls seen so far.
    pub fn assume_role_calls(&self) -> Vec<AssumeRoleCall> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(State(state): State<ProxyState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST),
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    if form.iter().any(|(k, v)| k == "Action" && v == "AssumeRole") {
        let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        state.calls.lock().unwrap().push(AssumeRoleCall {
            role_arn: get("RoleArn").unwrap_or_default(),
            external_id: get("ExternalId"),
        });
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut builder = hyper::Request::builder()
        .method(parts.method)
        .uri(format!("{}{}", state.upstream, path));
    for (k, v) in parts.headers.iter() {
        builder = builder.header(k, v);
    }
    let Ok(upstream_req) = builder.body(Full::new(body)) else {
        return status(StatusCode::BAD_REQUEST);
    };
    match state.client.request(upstream_req).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Response::from_parts(parts, Body::from(bytes))
        }
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = code;
    r
}
