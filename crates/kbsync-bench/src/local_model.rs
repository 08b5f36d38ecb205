//! The local model (all-MiniLM-L6-v2 with candle) against PyTorch in the same run:
//! the same weights, the same texts in the same batches of 32 the daemon sends,
//! chunks/s for short (~20 words) and long (~200 words) chunks, and how far the two
//! sets of vectors are apart. PyTorch (transformers + torch, CPU, as many threads as
//! candle gets) runs `tools/bench-model/pytorch_baseline.py` in the virtual
//! environment `scripts/torch-venv.sh` makes (several GB, once; only this section).
//! Three rounds of each; the median is reported.

use std::process::Command;
use std::time::Instant;

use kbsync_core::embed::InputOutcome;
use kbsync_core::embed::local::LocalModel;
use kbsync_testkit::repo_root;

const BATCH: usize = 32;
const ROUNDS: usize = 3;

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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

    // candle: warm up once, then the rounds.
    model
        .embed_blocking(&sets[0].1[0])
        .expect("embedding a warm-up batch");
    let mut candle_seconds: Vec<Vec<f64>> = vec![Vec::new(); sets.len()];
    let mut candle_vectors: Vec<Vec<Vec<f32>>> = vec![Vec::new(); sets.len()];
    for _ in 0..ROUNDS {
        for (i, (_, batches)) in sets.iter().enumerate() {
            let started = Instant::now();
            let mut vectors = Vec::new();
            for batch in batches {
                for outcome in model.embed_blocking(batch).expect("embedding") {
                    let v: InputOutcome = outcome;
                    vectors.push(
                        v.unwrap_or_else(|e| panic!("the local model refused a bench text: {e}")),
                    );
                }
            }
            candle_seconds[i].push(started.elapsed().as_secs_f64());
            candle_vectors[i] = vectors;
        }
    }

    // PyTorch: the same batches, in its own process.
    let python = Command::new(repo_root().join("scripts/torch-venv.sh"))
        .output()
        .expect("running scripts/torch-venv.sh");
    assert!(
        python.status.success(),
        "scripts/torch-venv.sh failed (the PyTorch baseline needs PyPI access, once): {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let python = String::from_utf8_lossy(&python.stdout).trim().to_owned();
    let batches_file = tempfile::NamedTempFile::new().expect("a temporary file");
    let by_label: serde_json::Map<String, serde_json::Value> = sets
        .iter()
        .map(|(label, batches)| (label.to_string(), serde_json::json!(batches)))
        .collect();
    let json = serde_json::json!({ "rounds": ROUNDS, "sets": by_label });
    std::fs::write(batches_file.path(), json.to_string()).expect("writing the batches");
    let out = Command::new(&python)
        .arg(repo_root().join("tools/bench-model/pytorch_baseline.py"))
        .arg(&dir)
        .arg(batches_file.path())
        .arg(threads.to_string())
        .output()
        .expect("running the PyTorch baseline");
    assert!(
        out.status.success(),
        "the PyTorch baseline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let torch: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the PyTorch baseline's JSON");

    let mut rows = Vec::new();
    for (i, (label, batches)) in sets.iter().enumerate() {
        let chunks: usize = batches.iter().map(Vec::len).sum();
        let result = &torch[*label];
        let torch_seconds: Vec<f64> = result["seconds"]
            .as_array()
            .expect("seconds per round")
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .collect();
        let torch_vectors: Vec<Vec<f64>> =
            serde_json::from_value(result["vectors"].clone()).expect("vectors");
        let max_diff = candle_vectors[i]
            .iter()
            .zip(&torch_vectors)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (f64::from(*x) - y).abs()))
            .fold(0.0_f64, f64::max);
        let candle_rate = chunks as f64 / median(candle_seconds[i].clone());
        let torch_rate = chunks as f64 / median(torch_seconds.clone());
        rows.push((
            format!("{label}: candle chunks/s"),
            format!(
                "{candle_rate:.0} ({chunks} chunks; rounds {:?} s)",
                rounded(&candle_seconds[i])
            ),
        ));
        rows.push((
            format!("{label}: PyTorch chunks/s ({threads} threads)"),
            format!("{torch_rate:.0} (rounds {:?} s)", rounded(&torch_seconds)),
        ));
        rows.push((
            format!("{label}: candle / PyTorch"),
            format!("{:.2}", candle_rate / torch_rate),
        ));
        rows.push((
            format!("{label}: largest |candle - PyTorch| over all vector components"),
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
