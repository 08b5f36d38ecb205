//! A local HTTP server that speaks the OpenAI embeddings API, for tests and
//! benchmarks: deterministic vectors, counters of what it received, injectable
//! latency and faults. It stands in for the paid API only; PostgreSQL is always real.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use sha2::{Digest, Sha256};

/// What the next request gets instead of a normal answer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// An HTTP error, with optional extra headers (e.g. `retry-after`).
    Status(u16, Vec<(&'static str, String)>),
    /// A 200 whose body is not JSON.
    Malformed,
    /// One vector fewer than inputs.
    WrongCount,
    /// Vectors of the wrong dimension.
    WrongDimension,
    /// Answer normally, but only after this long (past the client's request timeout).
    Stall(Duration),
    /// Send the status line and headers, then cut the connection in the middle of
    /// the body.
    DropConnection,
}

#[derive(Default)]
struct Inner {
    requests: Vec<Vec<String>>,
    /// When each request arrived.
    arrivals: Vec<std::time::Instant>,
    authorizations: Vec<String>,
    /// Each request's `encoding_format` ("" when it sent none).
    encoding_formats: Vec<String>,
    faults: VecDeque<Fault>,
    poison: Vec<String>,
    latency: Duration,
    base64: bool,
    /// Vectors from the text's words (`word_vector`) instead of its SHA-256.
    word_vectors: bool,
    success_headers: VecDeque<Vec<(&'static str, String)>>,
}

#[derive(Clone)]
struct Shared {
    dims: usize,
    inner: Arc<Mutex<Inner>>,
}

pub struct FakeOpenAi {
    addr: SocketAddr,
    shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeOpenAi {
    /// Start the server on a runtime of its own, so that a test blocking its own
    /// thread (running the kbsync binary, say) never stalls the server.
    pub async fn start(dims: usize) -> Self {
        let shared = Shared {
            dims,
            inner: Arc::new(Mutex::new(Inner::default())),
        };
        let app = Router::new()
            .route("/v1/embeddings", post(embeddings))
            .with_state(shared.clone());
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("the fake OpenAI server's runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind the fake OpenAI server");
                // The receivers are gone only when the test that started the server
                // ended: then nobody is left to tell.
                let _ = addr_tx.send(listener.local_addr().expect("local address"));
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        // Stop on the signal, or when its sender is dropped with the server.
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("the fake OpenAI server stopped serving");
            });
        });
        let addr = addr_rx.await.expect("the fake OpenAI server started");
        Self {
            addr,
            shared,
            stop: Some(stop_tx),
        }
    }

    /// Base URL to put in `embedding.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().expect("fake server state")
    }

    /// Queue faults for the next requests, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.inner().faults.extend(faults);
    }

    /// Drop every queued fault.
    pub fn clear_faults(&self) {
        self.inner().faults.clear();
    }

    /// Extra headers on the next successful answers, in order (e.g. `x-ratelimit-*`).
    pub fn push_success_headers(&self, headers: Vec<(&'static str, String)>) {
        self.inner().success_headers.push_back(headers);
    }

    /// Inputs containing `marker` are refused with a 400.
    pub fn poison(&self, marker: &str) {
        self.inner().poison.push(marker.to_owned());
    }

    /// Accept every input again.
    pub fn clear_poison(&self) {
        self.inner().poison.clear();
    }

    pub fn set_latency(&self, latency: Duration) {
        self.inner().latency = latency;
    }

    /// Answer with base64-encoded vectors whatever the request asked.
    pub fn answer_base64(&self, on: bool) {
        self.inner().base64 = on;
    }

    /// The most requests that arrived within any `window` (a sliding window over the
    /// arrival times).
    pub fn most_requests_within(&self, window: Duration) -> usize {
        let arrivals = self.inner().arrivals.clone();
        let mut most = 0;
        let mut start = 0;
        for end in 0..arrivals.len() {
            while arrivals[end] - arrivals[start] > window {
                start += 1;
            }
            most = most.max(end - start + 1);
        }
        most
    }

    /// Every request's `encoding_format`, in arrival order.
    pub fn encoding_formats(&self) -> Vec<String> {
        self.inner().encoding_formats.clone()
    }

    /// Every request's inputs, in arrival order (including refused ones).
    pub fn requests(&self) -> Vec<Vec<String>> {
        self.inner().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.inner().requests.len()
    }

    /// Inputs of requests that were answered with vectors.
    pub fn inputs_total(&self) -> usize {
        self.inner().requests.iter().map(Vec::len).sum()
    }

    pub fn authorizations(&self) -> Vec<String> {
        self.inner().authorizations.clone()
    }

    /// Vectors of texts that share words are near (`word_vector`), so a search for a
    /// question finds the chunk that holds it; by default every text's vector is as far
    /// from every other's as random vectors are.
    pub fn vectors_from_words(&self, on: bool) {
        self.inner().word_vectors = on;
    }

    /// The vector this server gives for `text`.
    pub fn vector_for(&self, text: &str) -> Vec<f32> {
        vector_of(text, self.shared.dims, self.inner().word_vectors)
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The server already stopped on its own when this fails: nothing to stop.
            let _ = stop.send(());
        }
    }
}

fn vector_of(text: &str, dims: usize, from_words: bool) -> Vec<f32> {
    if from_words {
        word_vector(text, dims)
    } else {
        deterministic_vector(text, dims)
    }
}

/// A unit vector of the text's words (lower-cased runs of letters and digits), each
/// word hashed to one dimension with a sign: texts that share words are near, as a
/// model's vectors of related texts are, and equal texts get equal vectors.
pub fn word_vector(text: &str, dims: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; dims];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let digest = Sha256::digest(word.to_lowercase().as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let at = (u64::from_le_bytes(first) % dims as u64) as usize;
        out[at] += if digest[8] & 1 == 0 { 1.0 } else { -1.0 };
    }
    unit(out)
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.into_iter().map(|x| x / norm).collect()
}

/// A unit vector derived from the text's SHA-256, so equal texts get equal vectors.
pub fn deterministic_vector(text: &str, dims: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(dims);
    let mut counter = 0u32;
    while out.len() < dims {
        let digest = Sha256::new()
            .chain_update(text.as_bytes())
            .chain_update(counter.to_le_bytes())
            .finalize();
        for pair in digest.chunks_exact(2) {
            if out.len() == dims {
                break;
            }
            let x = u16::from_le_bytes([pair[0], pair[1]]) as f32 / u16::MAX as f32;
            out.push(x * 2.0 - 1.0);
        }
        counter += 1;
    }
    unit(out)
}

fn error(status: u16, message: &str, headers: &[(&'static str, String)]) -> Response {
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(serde_json::json!({"error": {"message": message, "type": "test"}})),
    )
        .into_response();
    for (name, value) in headers {
        if let Ok(v) = value.parse() {
            response.headers_mut().insert(*name, v);
        }
    }
    response
}

async fn embeddings(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let inputs: Vec<String> = match &body["input"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().unwrap_or_default().to_owned())
            .collect(),
        _ => return error(400, "'input' must be a string or an array of strings", &[]),
    };
    let (fault, latency, poisoned, base64, word_vectors, extra_headers) = {
        let mut inner = shared.inner.lock().expect("fake server state");
        inner.requests.push(inputs.clone());
        inner.arrivals.push(std::time::Instant::now());
        inner.encoding_formats.push(
            body["encoding_format"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
            inner.authorizations.push(auth.to_owned());
        }
        let poisoned = inputs
            .iter()
            .any(|i| inner.poison.iter().any(|p| i.contains(p.as_str())));
        let fault = inner.faults.pop_front();
        let extra = if fault.is_none() && !poisoned {
            inner.success_headers.pop_front()
        } else {
            None
        };
        (
            fault,
            inner.latency,
            poisoned,
            inner.base64,
            inner.word_vectors,
            extra.unwrap_or_default(),
        )
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if inputs.iter().any(|i| i.is_empty()) {
        return error(400, "'$.input' is invalid: empty string", &[]);
    }
    let mut dims = shared.dims;
    let mut count = inputs.len();
    match fault {
        Some(Fault::Status(status, extra)) => return error(status, "injected fault", &extra),
        Some(Fault::Malformed) => return (StatusCode::OK, "{\"data\": [tru").into_response(),
        Some(Fault::WrongCount) => count = count.saturating_sub(1),
        Some(Fault::WrongDimension) => dims += 1,
        Some(Fault::Stall(for_how_long)) => tokio::time::sleep(for_how_long).await,
        Some(Fault::DropConnection) => {
            let cut = futures_util::stream::iter([
                Ok(axum::body::Bytes::from_static(
                    b"{\"object\": \"list\", \"data\": [",
                )),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "injected: connection cut mid-response",
                )),
            ]);
            return (StatusCode::OK, axum::body::Body::from_stream(cut)).into_response();
        }
        None => {}
    }
    if poisoned {
        return error(
            400,
            "This input was rejected by the test server's poison rule",
            &[],
        );
    }
    let want_base64 = base64 || body["encoding_format"].as_str() == Some("base64");
    let data: Vec<serde_json::Value> = inputs
        .iter()
        .take(count)
        .enumerate()
        .map(|(index, text)| {
            let v = vector_of(text, dims, word_vectors);
            let embedding = if want_base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                serde_json::json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                serde_json::json!(v)
            };
            serde_json::json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let mut response = Json(serde_json::json!({
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": 0, "total_tokens": 0}
    }))
    .into_response();
    for (name, value) in extra_headers {
        if let Ok(v) = value.parse() {
            response.headers_mut().insert(name, v);
        }
    }
    response
}
