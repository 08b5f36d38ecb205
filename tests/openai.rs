//! The OpenAI-compatible client against a local server that speaks the embeddings
//! API: response formats, retries and their delays, refusals, isolation of a bad
//! input, checks of what comes back, and the caps on what is sent.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use std::path::Path;
use std::time::{Duration, Instant};

use kbsync_core::config::Config;
use kbsync_core::sync::chunk::TokenCounter;
use kbsync_core::sync::embed::{EmbedError, Provider};
use kbsync_testkit::{FakeOpenAi, Fault, TempConfig, run_kbsync};

const DIMS: usize = 16;

/// A provider for `server`, the key in a file (tests cannot set env vars safely).
fn provider(server: &FakeOpenAi, extra: &str) -> (Provider, TempConfig) {
    // A temporary file holding the key (removed when the test drops it).
    let keep = TempConfig::new("sk-file-key-42");
    let timeout = if extra.contains("request_timeout") {
        ""
    } else {
        "request_timeout = \"5s\"\n"
    };
    let text = format!(
        "[embedding]\nprovider = \"openai\"\nmodel = \"test-embedding\"\ndimensions = {DIMS}\nbase_url = \"{}\"\napi_key_file = \"{}\"\n{timeout}{extra}\n\
         [sources.s]\ntable = \"t\"\nkey = \"id\"\ntenant = {{ column = \"u\" }}\ntext = \"{{body}}\"\n",
        server.base_url(),
        keep.path().display()
    );
    let config = Config::parse(&text, Path::new("test.toml")).unwrap();
    (Provider::from_config(&config).unwrap(), keep)
}

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("sentence number {i} about shipping"))
        .collect()
}

#[tokio::test]
async fn float_and_base64_answers_give_the_same_vectors_in_input_order() {
    let server = FakeOpenAi::start(DIMS).await;
    let (p, _k) = provider(&server, "");
    let (asks_floats, _k2) = provider(&server, "encoding_format = \"float\"");
    let inputs = texts(5);
    let decoded = p.embed(&inputs).await.unwrap();
    let floats = asks_floats.embed(&inputs).await.unwrap();
    // A server that answers base64 whatever it was asked is read too.
    server.answer_base64(true);
    let forced = asks_floats.embed(&inputs).await.unwrap();
    assert_eq!(server.encoding_formats(), ["base64", "float", "float"]);
    for (i, input) in inputs.iter().enumerate() {
        let want = server.vector_for(input);
        assert_eq!(floats[i].as_ref().unwrap(), &want);
        assert_eq!(decoded[i].as_ref().unwrap(), &want);
        assert_eq!(forced[i].as_ref().unwrap(), &want);
    }
    assert_eq!(server.authorizations()[0], "Bearer sk-file-key-42");
}

#[tokio::test]
async fn retry_after_in_seconds_and_as_an_http_date_is_honoured() {
    let server = FakeOpenAi::start(DIMS).await;
    let (p, _k) = provider(&server, "");
    server.push_faults([Fault::Status(429, vec![("retry-after", "2".to_owned())])]);
    let started = Instant::now();
    assert!(p.embed(&texts(1)).await.unwrap()[0].is_ok());
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.request_count(), 2);

    let date = (chrono_now() + 3).to_string();
    server.push_faults([Fault::Status(429, vec![("retry-after", date)])]);
    let started = Instant::now();
    assert!(p.embed(&texts(1)).await.unwrap()[0].is_ok());
    // An HTTP date has whole seconds: at least ~2 s of the 3 remain when it is read.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

/// "now" as an HTTP date, via the system's `date`, plus `secs` seconds.
fn chrono_now() -> HttpDate {
    HttpDate(std::time::SystemTime::now())
}

struct HttpDate(std::time::SystemTime);

impl std::ops::Add<u64> for HttpDate {
    type Output = HttpDate;
    fn add(self, secs: u64) -> HttpDate {
        HttpDate(self.0 + Duration::from_secs(secs))
    }
}

impl std::fmt::Display for HttpDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self
            .0
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let out = std::process::Command::new("date")
            .args([
                "-u",
                "-d",
                &format!("@{secs}"),
                "+%a, %d %b %Y %H:%M:%S GMT",
            ])
            .output()
            .unwrap();
        f.write_str(String::from_utf8_lossy(&out.stdout).trim())
    }
}

#[tokio::test]
async fn a_server_error_is_retried_and_then_succeeds() {
    let server = FakeOpenAi::start(DIMS).await;
    let (p, _k) = provider(&server, "");
    server.push_faults([
        Fault::Status(500, vec![]),
        Fault::Status(503, vec![]),
        Fault::Malformed,
    ]);
    assert!(p.embed(&texts(3)).await.unwrap().iter().all(Result::is_ok));
    assert_eq!(server.request_count(), 4);
}

#[tokio::test]
async fn a_request_that_times_out_is_retried_and_then_succeeds() {
    let server = FakeOpenAi::start(DIMS).await;
    let (p, _k) = provider(&server, "request_timeout = \"300ms\"");
    server.push_faults([Fault::Stall(Duration::from_secs(3))]);
    let got = p.embed(&texts(3)).await.unwrap();
    assert_eq!(server.request_count(), 2, "one timed out, one answered");
    for (text, vector) in texts(3).iter().zip(got) {
        assert_eq!(vector.unwrap(), server.vector_for(text));
    }
}

#[tokio::test]
async fn a_connection_cut_mid_response_is_retried_and_then_succeeds() {
    let server = FakeOpenAi::start(DIMS).await;
    let (p, _k) = provider(&server, "");
    server.push_faults([Fault::DropConnection, Fault::DropConnection]);
    let got = p.embed(&texts(3)).await.unwrap();
    assert_eq!(server.request_count(), 3, "two cut, one answered");
    for (text, vector) in texts(3).iter().zip(got) {
        assert_eq!(vector.unwrap(), server.vector_for(text));
    }
}

#[tokio::test]
async fn unauthorized_is_not_retried_and_names_where_the_key_comes_from() {
    let server = FakeOpenAi::start(DIMS).await;
    let (p, keep) = provider(&server, "");
    server.push_faults([Fault::Status(401, vec![])]);
    let err = p.embed(&texts(2)).await.unwrap_err();
    assert_eq!(server.request_count(), 1, "a 401 was retried");
    assert!(
        matches!(err, EmbedError::Refused { status: 401, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&keep.path().display().to_string()),
        "{err}"
    );
    assert!(!err.to_string().contains("sk-file-key-42"), "{err}");
}

#[tokio::test]
async fn the_cli_names_the_env_var_on_401_and_never_prints_the_key() {
    let server = FakeOpenAi::start(DIMS).await;
    server.push_faults([Fault::Status(401, vec![])]);
    let config = TempConfig::new(&format!(
        "[embedding]\nprovider = \"openai\"\nmodel = \"m\"\ndimensions = {DIMS}\nbase_url = \"{}\"\napi_key_env = \"MY_EMBED_KEY\"\n\
         [sources.s]\ntable = \"t\"\nkey = \"id\"\ntenant = {{ column = \"u\" }}\ntext = \"{{body}}\"\n",
        server.base_url()
    ));
    let out = run_kbsync(
        config.path(),
        &["embed", "hello"],
        &[("MY_EMBED_KEY", "sk-secret-777"), ("RUST_LOG", "debug")],
    );
    out.assert_failure();
    assert!(out.stderr.contains("$MY_EMBED_KEY"), "{}", out.stderr);
    assert!(!format!("{}{}", out.stdout, out.stderr).contains("sk-secret-777"));

    let ok = run_kbsync(
        config.path(),
        &["embed", "hello"],
        &[("MY_EMBED_KEY", "sk-secret-777")],
    );
    ok.assert_success();
    assert!(
        ok.stdout.contains(&format!("dimension  {DIMS}")),
        "{}",
        ok.stdout
    );
    assert!(ok.stdout.contains("norm       1.0000"), "{}", ok.stdout);
}

#[tokio::test]
async fn one_poisoned_input_fails_alone() {
    let server = FakeOpenAi::start(DIMS).await;
    let (p, _k) = provider(&server, "");
    server.poison("POISON");
    let mut inputs = texts(10);
    inputs[6] = "a POISON input".to_owned();
    let outcomes = p.embed(&inputs).await.unwrap();
    for (i, o) in outcomes.iter().enumerate() {
        assert_eq!(o.is_err(), i == 6, "input {i}: {o:?}");
    }
    assert!(outcomes[6].as_ref().unwrap_err().contains("400"));
}

#[tokio::test]
async fn a_wrong_dimension_or_count_is_an_error_not_retried() {
    let server = FakeOpenAi::start(DIMS).await;
    let (p, _k) = provider(&server, "");
    server.push_faults([Fault::WrongDimension]);
    let err = p.embed(&texts(2)).await.unwrap_err();
    assert!(
        matches!(err, EmbedError::Protocol(_)) && err.to_string().contains("dimensions"),
        "{err}"
    );
    server.push_faults([Fault::WrongCount]);
    let err = p.embed(&texts(2)).await.unwrap_err();
    assert!(err.to_string().contains("vectors for 2 inputs"), "{err}");
    assert_eq!(server.request_count(), 2);
}

#[tokio::test]
async fn the_requests_of_one_call_overlap_up_to_max_concurrency() {
    let server = FakeOpenAi::start(DIMS).await;
    server.set_latency(Duration::from_millis(500));
    let (p, _k) = provider(&server, "max_inputs_per_request = 2\nmax_concurrency = 4");
    let inputs = texts(24);
    let vectors = p.embed(&inputs).await.unwrap();
    // Twelve requests in waves of four: four arrive together, never a fifth before
    // one of them has been answered.
    assert_eq!(server.request_count(), 12);
    assert_eq!(server.most_requests_within(Duration::from_millis(300)), 4);
    for (input, vector) in inputs.iter().zip(&vectors) {
        assert_eq!(vector.as_ref().unwrap(), &server.vector_for(input));
    }
}

#[tokio::test]
async fn requests_stay_within_the_input_and_token_caps() {
    let server = FakeOpenAi::start(DIMS).await;
    let (p, _k) = provider(
        &server,
        "max_inputs_per_request = 7\nmax_tokens_per_request = 600\nmax_chunk_tokens = 100",
    );
    let inputs: Vec<String> = (0..60)
        .map(|i| format!("input {i} ") + &"word ".repeat(5 + (i * 7) % 60))
        .collect();
    assert!(p.embed(&inputs).await.unwrap().iter().all(Result::is_ok));
    let counter = TokenCounter::cl100k();
    let requests = server.requests();
    assert!(requests.len() > 1);
    for r in &requests {
        assert!(r.len() <= 7, "{} inputs", r.len());
        let tokens: usize = r.iter().map(|t| counter.count(t)).sum();
        assert!(tokens <= 600, "{tokens} tokens");
        assert!(r.iter().all(|t| !t.is_empty()));
    }
    assert_eq!(requests.iter().map(Vec::len).sum::<usize>(), 60);
}

#[tokio::test]
async fn a_used_up_rate_limit_pauses_the_next_request_without_a_429() {
    let server = FakeOpenAi::start(DIMS).await;
    let (p, _k) = provider(&server, "");
    server.push_success_headers(vec![
        ("x-ratelimit-remaining-requests", "0".to_owned()),
        ("x-ratelimit-reset-requests", "1500ms".to_owned()),
    ]);
    assert!(p.embed(&texts(1)).await.unwrap()[0].is_ok());
    let started = Instant::now();
    assert!(p.embed(&texts(1)).await.unwrap()[0].is_ok());
    assert!(
        started.elapsed() >= Duration::from_millis(1300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        server.request_count(),
        2,
        "the pause should have avoided any 429 retry"
    );
    // Budget left: no pause.
    let started = Instant::now();
    assert!(p.embed(&texts(1)).await.unwrap()[0].is_ok());
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
}
