//! A batch's plan, a pure function of what was read: per key, which chunks stay as
//! they are, which reuse a stored vector, and which texts need a new embedding (each
//! distinct text once); then, with the vectors in, the writes, each key's new chunk
//! count and the keys that failed. No database, no provider: unit-tested below.

use std::collections::HashMap;

use pgvector::Vector;

use kbsync_core::outbox::Failure;
use kbsync_core::sync::chunk::{Chunk, content_hash};
use kbsync_core::sync::embed::InputOutcome;
use kbsync_core::sync::knowledge::{ChunkWrite, StoredChunk};
use kbsync_core::sync::source_rows::SourceRow;

/// What the batch writes with: a stored chunk is as good as new only if it was
/// written by this model and cut this way.
pub(crate) struct Writing<'a> {
    pub model: &'a str,
    /// The chunker's fingerprint.
    pub chunking: &'a str,
}

/// What a key's chunks need.
pub(crate) struct KeyPlan {
    tenant: String,
    text_hash: [u8; 32],
    text_hash64: i64,
    metadata: serde_json::Value,
    chunks: Vec<Chunk>,
    /// Per chunk: a stored embedding that can be reused, or the index into the
    /// batch's list of texts to embed.
    sources: Vec<EmbeddingSource>,
    /// Per chunk: true when the stored row at that index is already exactly this.
    unchanged: Vec<bool>,
}

enum EmbeddingSource {
    Stored(Vector),
    Input(usize),
}

/// Every key's plan and the distinct texts to embed.
pub(crate) struct Planned {
    /// By key; a key whose row is gone (or filtered out) has none.
    pub plans: HashMap<String, KeyPlan>,
    /// The texts that need a vector, each once.
    pub inputs: Vec<String>,
    /// Each input's content hash.
    pub hashes: Vec<[u8; 32]>,
    /// Keys whose text the chunker failed on, with the error.
    pub unchunkable: HashMap<String, String>,
}

/// Plan `keys`: `rows` are the current rows (a key without one is gone), `chunked`
/// each row's chunks or the chunker's error, `stored` each key's chunks as stored.
pub(crate) fn plan(
    keys: &[String],
    rows: &HashMap<String, SourceRow>,
    mut chunked: HashMap<String, Result<Vec<Chunk>, String>>,
    stored: &HashMap<String, Vec<StoredChunk>>,
    writing: &Writing,
) -> Planned {
    let mut planned = Planned {
        plans: HashMap::new(),
        inputs: Vec::new(),
        hashes: Vec::new(),
        unchunkable: HashMap::new(),
    };
    let mut input_by_hash: HashMap<[u8; 32], usize> = HashMap::new();
    for key in keys {
        let Some(row) = rows.get(key) else { continue };
        let chunks = match chunked.remove(key) {
            Some(Ok(chunks)) => chunks,
            Some(Err(panic)) => {
                planned.unchunkable.insert(
                    key.clone(),
                    format!("the chunker failed on this text: {panic}"),
                );
                continue;
            }
            // A row the chunker was not given: no chunks.
            None => Vec::new(),
        };
        let text_hash = content_hash(&row.text);
        let chunk_count = chunks.len() as i32;
        let existing: &[StoredChunk] = stored.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let mut sources = Vec::with_capacity(chunks.len());
        let mut unchanged = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let reusable = |s: &&StoredChunk| {
                s.hash == chunk.hash
                    && s.intact
                    && s.embedding.is_some()
                    && s.model.as_deref() == Some(writing.model)
            };
            let at_index = existing.iter().find(|s| s.index == i as i32);
            unchanged.push(at_index.filter(reusable).is_some_and(|s| {
                s.tenant == row.tenant
                    && s.metadata == row.metadata
                    && s.source_text_hash.as_deref() == Some(text_hash.as_slice())
                    && s.source_text_hash64 == Some(row.text_hash64)
                    && s.has_content_hash64
                    && s.chunking.as_deref() == Some(writing.chunking)
                    && s.chunk_count == Some(chunk_count)
            }));
            // Same text anywhere in the key's old chunks (e.g. shifted by an insert).
            match existing
                .iter()
                .find(reusable)
                .and_then(|s| s.embedding.clone())
            {
                Some(v) => sources.push(EmbeddingSource::Stored(v)),
                None => {
                    let next = planned.inputs.len();
                    let at = *input_by_hash.entry(chunk.hash).or_insert(next);
                    if at == next {
                        planned.inputs.push(chunk.content.clone());
                        planned.hashes.push(chunk.hash);
                    }
                    sources.push(EmbeddingSource::Input(at));
                }
            }
        }
        planned.plans.insert(
            key.clone(),
            KeyPlan {
                tenant: row.tenant.clone(),
                text_hash,
                text_hash64: row.text_hash64,
                metadata: row.metadata.clone(),
                chunks,
                sources,
                unchanged,
            },
        );
    }
    planned
}

/// What the batch's write transaction does.
pub(crate) struct Assembled {
    /// Chunks to upsert (the unchanged ones are left out).
    pub writes: Vec<ChunkWrite>,
    /// Each written key's chunk count (0: the row is gone, its chunks go).
    pub lengths: Vec<(String, i32)>,
    /// Keys that fail: unchunkable, or a chunk's text refused by the provider.
    pub failures: Vec<Failure>,
}

/// The writes of `keys` given each input's `outcomes` (in `Planned::inputs` order).
/// A key with any refused chunk fails as a whole.
pub(crate) fn assemble(
    keys: &[String],
    planned: Planned,
    outcomes: &[InputOutcome],
    writing: &Writing,
) -> Assembled {
    let Planned {
        mut plans,
        mut unchunkable,
        ..
    } = planned;
    let mut out = Assembled {
        writes: Vec::new(),
        lengths: Vec::new(),
        failures: Vec::new(),
    };
    for key in keys {
        if let Some(error) = unchunkable.remove(key) {
            out.failures.push(Failure {
                key: key.clone(),
                error,
            });
            continue;
        }
        let Some(plan) = plans.remove(key) else {
            // Row gone or filtered out: its chunks go.
            out.lengths.push((key.clone(), 0));
            continue;
        };
        // Each chunk's vector; the first refused text fails the key.
        let vectors: Result<Vec<Vector>, String> = plan
            .sources
            .into_iter()
            .map(|src| match src {
                EmbeddingSource::Stored(v) => Ok(v),
                EmbeddingSource::Input(at) => match outcomes.get(at) {
                    Some(Ok(v)) => Ok(Vector::from(v.clone())),
                    Some(Err(e)) => Err(e.clone()),
                    None => Err("no vector was obtained for this text".to_owned()),
                },
            })
            .collect();
        let vectors = match vectors {
            Ok(vectors) => vectors,
            Err(error) => {
                out.failures.push(Failure {
                    key: key.clone(),
                    error,
                });
                continue;
            }
        };
        let count = plan.chunks.len();
        for (i, ((chunk, embedding), unchanged)) in plan
            .chunks
            .into_iter()
            .zip(vectors)
            .zip(plan.unchanged)
            .enumerate()
        {
            if unchanged {
                continue;
            }
            out.writes.push(ChunkWrite {
                tenant: plan.tenant.clone(),
                key: key.clone(),
                index: i as i32,
                content: chunk.content,
                hash: chunk.hash.to_vec(),
                embedding,
                model: writing.model.to_owned(),
                metadata: plan.metadata.clone(),
                source_text_hash: plan.text_hash.to_vec(),
                source_text_hash64: plan.text_hash64,
                chunking: writing.chunking.to_owned(),
                chunk_count: count as i32,
            });
        }
        out.lengths.push((key.clone(), count as i32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITING: Writing = Writing {
        model: "m",
        chunking: "cut-1",
    };

    fn row(key: &str, text: &str) -> (String, SourceRow) {
        let row = SourceRow {
            key: key.to_owned(),
            tenant: "1".to_owned(),
            text: text.to_owned(),
            text_hash64: 7,
            metadata: serde_json::json!({}),
        };
        (key.to_owned(), row)
    }

    fn chunk(text: &str) -> Chunk {
        Chunk {
            content: text.to_owned(),
            hash: content_hash(text),
            tokens: 1,
        }
    }

    /// The chunk `text` as kbsync stored it at `index` of a key whose whole text was
    /// `whole`, cut into `count` chunks.
    fn stored(index: i32, text: &str, whole: &str, count: i32, vector: f32) -> StoredChunk {
        StoredChunk {
            index,
            hash: content_hash(text).to_vec(),
            embedding: Some(Vector::from(vec![vector])),
            model: Some("m".to_owned()),
            tenant: "1".to_owned(),
            metadata: serde_json::json!({}),
            source_text_hash: Some(content_hash(whole).to_vec()),
            chunking: Some("cut-1".to_owned()),
            chunk_count: Some(count),
            source_text_hash64: Some(7),
            has_content_hash64: true,
            intact: true,
        }
    }

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|k| (*k).to_owned()).collect()
    }

    #[test]
    fn a_text_shared_by_two_keys_is_embedded_once_and_written_to_both() {
        let rows = [row("a", "same"), row("b", "same")].into_iter().collect();
        let chunked = [
            ("a".to_owned(), Ok(vec![chunk("same")])),
            ("b".to_owned(), Ok(vec![chunk("same")])),
        ]
        .into_iter()
        .collect();
        let keys = keys(&["a", "b"]);
        let planned = plan(&keys, &rows, chunked, &HashMap::new(), &WRITING);
        assert_eq!(planned.inputs, ["same"]);
        let out = assemble(&keys, planned, &[Ok(vec![0.5])], &WRITING);
        assert_eq!(out.writes.len(), 2);
        assert!(
            out.writes
                .iter()
                .all(|w| w.embedding == Vector::from(vec![0.5]))
        );
        assert_eq!(out.lengths, [("a".to_owned(), 1), ("b".to_owned(), 1)]);
        assert!(out.failures.is_empty());
    }

    #[test]
    fn a_shifted_chunk_reuses_its_stored_vector_and_an_unchanged_one_is_not_rewritten() {
        // Stored: [x] from the text "x"; now: [new, x] from "new x".
        let rows = [row("a", "new x")].into_iter().collect();
        let chunked = [("a".to_owned(), Ok(vec![chunk("new"), chunk("x")]))]
            .into_iter()
            .collect();
        let stored_chunks = [("a".to_owned(), vec![stored(0, "x", "x", 1, 0.25)])]
            .into_iter()
            .collect();
        let keys = keys(&["a"]);
        let planned = plan(&keys, &rows, chunked, &stored_chunks, &WRITING);
        // Only the new text is sent.
        assert_eq!(planned.inputs, ["new"]);
        let out = assemble(&keys, planned, &[Ok(vec![0.75])], &WRITING);
        let written: Vec<(i32, &str, Vector)> = out
            .writes
            .iter()
            .map(|w| (w.index, w.content.as_str(), w.embedding.clone()))
            .collect();
        assert_eq!(
            written,
            [
                (0, "new", Vector::from(vec![0.75])),
                (1, "x", Vector::from(vec![0.25]))
            ]
        );

        // Read again with nothing changed: nothing to embed, nothing to write.
        let rows = [row("a", "x")].into_iter().collect();
        let chunked = [("a".to_owned(), Ok(vec![chunk("x")]))]
            .into_iter()
            .collect();
        let planned = plan(&keys, &rows, chunked, &stored_chunks, &WRITING);
        assert!(planned.inputs.is_empty());
        let out = assemble(&keys, planned, &[], &WRITING);
        assert!(out.writes.is_empty());
        assert_eq!(out.lengths, [("a".to_owned(), 1)]);
    }

    #[test]
    fn a_vector_of_another_model_or_an_altered_chunk_is_not_reused() {
        let rows = [row("a", "x")].into_iter().collect();
        let mut other_model = stored(0, "x", "x", 1, 0.25);
        other_model.model = Some("old".to_owned());
        let mut altered = stored(0, "x", "x", 1, 0.25);
        altered.intact = false;
        for stale in [other_model, altered] {
            let chunked = [("a".to_owned(), Ok(vec![chunk("x")]))]
                .into_iter()
                .collect();
            let stored_chunks = [("a".to_owned(), vec![stale])].into_iter().collect();
            let planned = plan(&keys(&["a"]), &rows, chunked, &stored_chunks, &WRITING);
            assert_eq!(planned.inputs, ["x"]);
        }
    }

    #[test]
    fn a_refused_text_fails_its_key_whole_and_the_others_are_written() {
        let rows = [row("a", "good bad"), row("b", "fine")]
            .into_iter()
            .collect();
        let chunked = [
            ("a".to_owned(), Ok(vec![chunk("good"), chunk("bad")])),
            ("b".to_owned(), Ok(vec![chunk("fine")])),
        ]
        .into_iter()
        .collect();
        let keys = keys(&["a", "b"]);
        let planned = plan(&keys, &rows, chunked, &HashMap::new(), &WRITING);
        assert_eq!(planned.inputs, ["good", "bad", "fine"]);
        let out = assemble(
            &keys,
            planned,
            &[Ok(vec![1.0]), Err("refused: 400".to_owned()), Ok(vec![2.0])],
            &WRITING,
        );
        assert_eq!(out.failures.len(), 1);
        assert_eq!(
            (out.failures[0].key.as_str(), out.failures[0].error.as_str()),
            ("a", "refused: 400")
        );
        let written: Vec<&str> = out.writes.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(written, ["b"]);
        assert_eq!(out.lengths, [("b".to_owned(), 1)]);
    }

    #[test]
    fn a_gone_row_loses_its_chunks_and_an_unchunkable_one_fails() {
        let rows = [row("bad", "BOOM")].into_iter().collect();
        let chunked = [("bad".to_owned(), Err("boom".to_owned()))]
            .into_iter()
            .collect();
        let keys = keys(&["gone", "bad"]);
        let planned = plan(&keys, &rows, chunked, &HashMap::new(), &WRITING);
        let out = assemble(&keys, planned, &[], &WRITING);
        assert_eq!(out.lengths, [("gone".to_owned(), 0)]);
        assert_eq!(out.failures.len(), 1);
        assert_eq!(out.failures[0].key, "bad");
        assert!(
            out.failures[0]
                .error
                .contains("the chunker failed on this text: boom")
        );
    }
}
