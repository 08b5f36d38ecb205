//! The local model (all-MiniLM-L6-v2, kbsync's encoder) against PyTorch in the same
//! run: the same weights, the same texts in the same batches of 32 the daemon sends,
//! chunks/s for short (~20 words) and long (~200 words) chunks, and how far the two
//! sets of vectors are apart. PyTorch (transformers + torch, CPU, as many threads as
//! kbsync uses) runs `tools/bench-model/pytorch_baseline.py` in the virtual
//! environment `scripts/venv.sh torch tools/bench-model/requirements.txt` makes (several GB, once; only this section).
//! Five rounds of each, alternating; the median is reported.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use kbsync_core::sync::embed::local::LocalModel;
use kbsync_testkit::repo_root;
use tempfile::NamedTempFile;

use crate::statistics::median;

const BATCH: usize = 32;
const ROUNDS: usize = 5;

/// (label, words per chunk, chunks)
const SETS: [(&str, usize, usize); 2] = [
    ("short (~20 words)", 20, 256),
    ("long (~200 words)", 200, 64),
];

fn words(n: usize, seed: usize) -> String {
    const VOCAB: [&str; 16] = [
        "delivery", "order", "returns", "warranty", "bike", "bread", "tent", "payment", "shop",
        "open", "price", "days", "refund", "Monday", "helmet", "size",
    ];
    (0..n)
        .map(|i| VOCAB[(i * 7 + seed * 3 + i / 5) % VOCAB.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the PyTorch baseline one round at a time (so that its rounds alternate with
/// kbsync's and both see the same machine), then collects its vectors.
struct PyTorch {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl PyTorch {
    fn start(
        dir: &Path,
        sets: &[(&str, Vec<Vec<String>>)],
        threads: usize,
    ) -> (Self, NamedTempFile) {
        let python = run_ok(
            Command::new(repo_root().join("scripts/venv.sh"))
                .arg("torch")
                .arg("tools/bench-model/requirements.txt"),
            "scripts/venv.sh torch (the PyTorch baseline needs PyPI access, once)",
        );
        let batches = NamedTempFile::new().expect("a temporary file");
        let by_label: serde_json::Map<String, serde_json::Value> = sets
            .iter()
            .map(|(label, batches)| (label.to_string(), serde_json::json!(batches)))
            .collect();
        std::fs::write(
            batches.path(),
            serde_json::json!({ "sets": by_label }).to_string(),
        )
        .expect("writing the batches");
        let mut child = Command::new(python.trim())
            .arg(repo_root().join("tools/bench-model/pytorch_baseline.py"))
            .arg(dir)
            .arg(batches.path())
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("running the PyTorch baseline");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut torch = Self {
            child,
            stdin,
            stdout,
        };
        assert_eq!(torch.line(), "ready", "the PyTorch baseline did not start");
        (torch, batches)
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading the PyTorch baseline");
        assert!(
            !line.is_empty(),
            "the PyTorch baseline exited (its stderr is above)"
        );
        line.trim().to_owned()
    }

    fn round(&mut self, label: &str) -> f64 {
        let stdin = self.stdin.as_mut().expect("the baseline's stdin is open");
        writeln!(stdin, "{label}").expect("writing to the PyTorch baseline");
        stdin.flush().expect("writing to the PyTorch baseline");
        let line = self.line();
        line.parse()
            .unwrap_or_else(|_| panic!("the PyTorch baseline answered {line:?}"))
    }

    /// Each set's vectors from its last round.
    fn finish(mut self) -> serde_json::Value {
        drop(self.stdin.take());
        let mut json = String::new();
        self.stdout
            .read_to_string(&mut json)
            .expect("reading the PyTorch baseline");
        let status = self.child.wait().expect("waiting for the PyTorch baseline");
        assert!(status.success(), "the PyTorch baseline failed: {status}");
        serde_json::from_str(&json).expect("the PyTorch baseline's JSON")
    }
}

pub(crate) fn run_ok(command: &mut Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn rows() -> Vec<(String, String)> {
    let dir = repo_root().join(".kbsync/models/all-MiniLM-L6-v2");
    let model = LocalModel::load(&dir, "all-MiniLM-L6-v2")
        .expect("the local model (`just model` fetches it)");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sets: Vec<(&str, Vec<Vec<String>>)> = SETS
        .iter()
        .map(|(label, n_words, count)| {
            let chunks: Vec<String> = (0..*count).map(|i| words(*n_words, i)).collect();
            (
                *label,
                chunks.chunks(BATCH).map(<[String]>::to_vec).collect(),
            )
        })
        .collect();
    let (mut torch, _batches) = PyTorch::start(&dir, &sets, threads);

    // kbsync: warm up once (PyTorch did), then rounds alternating with PyTorch's.
    model
        .embed_blocking(&sets[0].1[0])
        .expect("embedding a warm-up batch");
    let mut kbsync_seconds: Vec<Vec<f64>> = vec![Vec::new(); sets.len()];
    let mut torch_seconds: Vec<Vec<f64>> = vec![Vec::new(); sets.len()];
    let mut kbsync_vectors: Vec<Vec<Vec<f32>>> = vec![Vec::new(); sets.len()];
    for _ in 0..ROUNDS {
        for (i, (label, batches)) in sets.iter().enumerate() {
            let started = Instant::now();
            let mut vectors = Vec::new();
            for batch in batches {
                for outcome in model.embed_blocking(batch).expect("embedding") {
                    vectors.push(
                        outcome.unwrap_or_else(|e| {
                            panic!("the local model refused a bench text: {e}")
                        }),
                    );
                }
            }
            kbsync_seconds[i].push(started.elapsed().as_secs_f64());
            kbsync_vectors[i] = vectors;
            torch_seconds[i].push(torch.round(label));
        }
    }
    let torch_vectors = torch.finish();

    let mut rows = Vec::new();
    for (i, (label, batches)) in sets.iter().enumerate() {
        let chunks: usize = batches.iter().map(Vec::len).sum();
        let theirs: Vec<Vec<f64>> =
            serde_json::from_value(torch_vectors[*label].clone()).expect("vectors");
        let max_diff = kbsync_vectors[i]
            .iter()
            .zip(&theirs)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (f64::from(*x) - y).abs()))
            .fold(0.0_f64, f64::max);
        let kbsync_rate = chunks as f64 / median(&mut kbsync_seconds[i].clone());
        let torch_rate = chunks as f64 / median(&mut torch_seconds[i].clone());
        rows.push((
            format!("{label}: kbsync chunks/s"),
            format!(
                "{kbsync_rate:.0} ({chunks} chunks; rounds {:?} s)",
                rounded(&kbsync_seconds[i])
            ),
        ));
        rows.push((
            format!("{label}: PyTorch chunks/s ({threads} threads)"),
            format!(
                "{torch_rate:.0} (rounds {:?} s)",
                rounded(&torch_seconds[i])
            ),
        ));
        rows.push((
            format!("{label}: kbsync / PyTorch"),
            format!("{:.2}", kbsync_rate / torch_rate),
        ));
        rows.push((
            format!("{label}: largest |kbsync - PyTorch| over all vector components"),
            format!("{max_diff:.1e}"),
        ));
    }
    rows
}

fn rounded(seconds: &[f64]) -> Vec<f64> {
    seconds
        .iter()
        .map(|s| (s * 100.0).round() / 100.0)
        .collect()
}
