//! The local model (all-MiniLM-L6-v2, kbsync's encoder) against reference vectors from an
//! independent NumPy implementation (tools/reference/minilm_reference.py), embedded
//! together in one batch so that padding and the attention mask are exercised.

#![allow(clippy::unwrap_used)] // a failed setup step in a test should panic right there

use kbsync_core::sync::embed::local::LocalModel;
use kbsync_testkit::repo_root;

fn model() -> LocalModel {
    let dir = repo_root().join(".kbsync/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run `just model` (`just test` does)",
        dir.display()
    );
    LocalModel::load(&dir, "all-MiniLM-L6-v2").unwrap()
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn vectors_match_the_independent_reference_to_1e_4() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/data/minilm_reference.json")).unwrap(),
    )
    .unwrap();
    let sentences = reference["sentences"].as_array().unwrap();
    let texts: Vec<String> = sentences
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_owned())
        .collect();
    let got = model().embed_blocking(&texts).unwrap();
    for (sentence, outcome) in sentences.iter().zip(got) {
        let v = outcome.unwrap();
        let want: Vec<f32> = sentence["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(v.len(), 384);
        let worst = largest_difference(&v, &want);
        assert!(
            worst < 1e-4,
            "{:?}: max difference {worst}",
            sentence["text"]
        );
        assert!((dot(&v, &v).sqrt() - 1.0).abs() < 1e-5, "not unit length");
    }
}

#[test]
fn paraphrases_score_higher_than_unrelated_sentences() {
    let texts: Vec<String> = [
        "How long does shipping take?",
        "What is the delivery time for my order?",
        "Can I pay with PayPal?",
        "Which payment methods do you accept?",
        "The mountain bike has hydraulic disc brakes.",
    ]
    .map(String::from)
    .to_vec();
    let v: Vec<Vec<f32>> = model()
        .embed_blocking(&texts)
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(
        dot(&v[0], &v[1]) > dot(&v[0], &v[2]) + 0.2,
        "shipping paraphrase"
    );
    assert!(
        dot(&v[0], &v[1]) > dot(&v[0], &v[4]) + 0.2,
        "shipping vs bikes"
    );
    assert!(
        dot(&v[2], &v[3]) > dot(&v[2], &v[1]) + 0.2,
        "payment paraphrase"
    );
}

#[test]
fn a_text_alone_and_in_a_padded_batch_gets_the_same_vector() {
    let m = model();
    let short = "Open on Saturdays?".to_owned();
    let long = "Our shop is open Monday to Friday from 9 am to 6 pm and on Saturdays from 10 am to 4 pm, closed on Sundays and public holidays.".to_owned();
    let alone = m
        .embed_blocking(std::slice::from_ref(&short))
        .unwrap()
        .remove(0)
        .unwrap();
    let batched = m.embed_blocking(&[long, short]).unwrap().remove(1).unwrap();
    let worst = largest_difference(&alone, &batched);
    assert!(
        worst < 1e-5,
        "padding changed the vector by {worst}: the attention mask is not applied"
    );
    // What a model migration reports for the local model: texts and tokens, no requests.
    let sent = m.sent();
    assert_eq!((sent.requests, sent.inputs), (0, 3));
    assert!(sent.tokens > 3 + 30, "{sent:?}");
}

#[test]
fn a_large_mixed_batch_packed_and_shared_between_cores_matches_each_text_alone() {
    let m = model();
    // 70 texts from 3 to ~400 words: several forward passes per core, texts cut at
    // 256 tokens, shares of unequal counts.
    let words = [
        "delivery", "bike", "refund", "helmet", "open", "Monday", "warranty", "size",
    ];
    let texts: Vec<String> = (0..70)
        .map(|i| {
            let n = 3 + (i * 53) % 400;
            (0..n)
                .map(|j| words[(i + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let together = m.embed_blocking(&texts).unwrap();
    for (text, v) in texts.iter().zip(together) {
        let v = v.unwrap();
        let alone = m
            .embed_blocking(std::slice::from_ref(text))
            .unwrap()
            .remove(0)
            .unwrap();
        let worst = largest_difference(&v, &alone);
        assert!(
            worst < 1e-5,
            "{} words: batched differs from alone by {worst}",
            text.split(' ').count()
        );
    }
}

#[test]
fn a_model_of_another_architecture_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let source = repo_root().join(".kbsync/models/all-MiniLM-L6-v2");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(source.join("config.json")).unwrap()).unwrap();
    config["hidden_act"] = "gelu_new".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = LocalModel::load(dir.path(), "all-MiniLM-L6-v2")
        .err()
        .expect("a tanh-GELU model must be refused")
        .to_string();
    assert!(
        err.contains("hidden_act \"gelu_new\"") && err.contains(&dir.path().display().to_string()),
        "{err}"
    );
}
