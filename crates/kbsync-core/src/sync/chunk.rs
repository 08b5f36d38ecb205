//! Chunking: a source row's text into token-sized pieces at semantic boundaries
//! (text-splitter), each with a content hash that decides whether it needs embedding.

use sha2::{Digest, Sha256};
use text_splitter::{ChunkConfig, ChunkSizer, TextSplitter};
use thiserror::Error;
use tiktoken_rs::CoreBPE;

use crate::config::{Config, ProviderKind, Source};

/// Counts tokens the way the embedding model does.
#[derive(Clone)]
pub enum TokenCounter {
    /// OpenAI's cl100k_base BPE (bundled with tiktoken-rs; no download).
    Cl100k(&'static CoreBPE),
    /// The local model's own WordPiece tokenizer (no padding, no truncation).
    WordPiece(std::sync::Arc<tokenizers::Tokenizer>),
}

impl TokenCounter {
    pub fn cl100k() -> Self {
        Self::Cl100k(tiktoken_rs::cl100k_base_singleton())
    }

    pub fn count(&self, text: &str) -> usize {
        match self {
            Self::Cl100k(bpe) => bpe.encode_ordinary(text).len(),
            // An input the tokenizer cannot read counts as too long, never as short.
            Self::WordPiece(tok) => tok
                .encode(text, false)
                .map(|e| e.len())
                .unwrap_or(usize::MAX),
        }
    }
}

impl TokenCounter {
    /// The tokenizer's name, as recorded in the chunking fingerprint.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cl100k(_) => Self::name_for(ProviderKind::Openai),
            Self::WordPiece(_) => Self::name_for(ProviderKind::Local),
        }
    }

    /// The tokenizer a provider's chunks are counted with.
    pub fn name_for(provider: ProviderKind) -> &'static str {
        match provider {
            ProviderKind::Openai => "cl100k_base",
            ProviderKind::Local => "wordpiece",
        }
    }
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cl100k(_) => "TokenCounter(cl100k_base)",
            Self::WordPiece(_) => "TokenCounter(WordPiece)",
        })
    }
}

impl ChunkSizer for TokenCounter {
    fn size(&self, chunk: &str) -> usize {
        self.count(chunk)
    }
}

#[derive(Debug, Error)]
pub enum ChunkError {
    #[error("chunk settings rejected: {0}")]
    Config(String),
}

/// One piece of a row's text, ready to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub content: String,
    pub hash: [u8; 32],
    pub tokens: usize,
}

impl Chunk {
    fn new(content: &str, counter: &TokenCounter) -> Self {
        Self {
            content: content.to_owned(),
            hash: content_hash(content),
            tokens: counter.count(content),
        }
    }
}

pub fn content_hash(content: &str) -> [u8; 32] {
    Sha256::digest(content.as_bytes()).into()
}

/// Everything besides the text that decides how a source's text is cut and indexed.
/// Stored with every chunk; when today's differs, the reconcile sweep has the key
/// re-chunked (embeddings of unchanged texts are reused). The splitter's version is
/// part of it: a new version may cut differently. A text search configuration other
/// than the default is too (its tsvector is written with the chunk); the default
/// adds nothing, so chunks written before full-text search match as they are.
pub fn fingerprint(source: &Source, tokenizer: &str, model_limit: usize) -> String {
    let mut out = format!(
        "text-splitter-0.33 tokenizer={tokenizer} tokens={} overlap={} single={} limit={model_limit}",
        source.chunk_tokens, source.chunk_overlap, source.single_chunk
    );
    if source.text_search.as_str() != "simple" {
        out.push_str(&format!(" text_search={}", source.text_search.as_str()));
    }
    out
}

/// `fingerprint` from the config alone, for the sweep (which loads no model).
pub fn fingerprint_for(source: &Source, config: &Config) -> String {
    fingerprint(
        source,
        TokenCounter::name_for(config.embedding.provider),
        config.model_token_limit(),
    )
}

/// Splits texts for one source.
pub struct Chunker {
    splitter: TextSplitter<TokenCounter>,
    counter: TokenCounter,
    single_chunk: bool,
    model_limit: usize,
    fingerprint: String,
}

impl Chunker {
    pub fn new(
        source: &Source,
        counter: TokenCounter,
        model_limit: usize,
    ) -> Result<Self, ChunkError> {
        // Config validation keeps chunk_tokens within the model's limit; the clamp makes
        // "no chunk is longer than the model reads" hold for every caller of this API.
        let config = ChunkConfig::new(source.chunk_tokens.min(model_limit))
            .with_sizer(counter.clone())
            .with_overlap(source.chunk_overlap)
            .map_err(|e| ChunkError::Config(e.to_string()))?;
        Ok(Self {
            splitter: TextSplitter::new(config),
            fingerprint: fingerprint(source, counter.name(), model_limit),
            counter,
            single_chunk: source.single_chunk,
            model_limit,
        })
    }

    /// The chunks of `text`, in order. Empty or whitespace-only text has none.
    /// `single_chunk` sources keep the whole text as one chunk unless it is longer
    /// than the model reads, in which case it is split like any other text rather
    /// than silently truncated by the model.
    pub fn chunk(&self, text: &str) -> Vec<Chunk> {
        let text = text.trim();
        if text.is_empty() {
            return Vec::new();
        }
        if self.single_chunk && self.counter.count(text) <= self.model_limit {
            return vec![Chunk::new(text, &self.counter)];
        }
        self.splitter
            .chunks(text)
            .map(|piece| Chunk::new(piece, &self.counter))
            .collect()
    }

    pub fn counter(&self) -> &TokenCounter {
        &self.counter
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(single: bool, tokens: usize, overlap: usize) -> Source {
        config(single, tokens, overlap).sources()[0].clone()
    }

    fn config(single: bool, tokens: usize, overlap: usize) -> Config {
        crate::config::for_tests(
            "",
            &format!("single_chunk = {single}\nchunk_tokens = {tokens}\nchunk_overlap = {overlap}"),
        )
    }

    #[test]
    fn empty_and_whitespace_text_has_no_chunks() {
        let chunker = Chunker::new(&source(false, 50, 5), TokenCounter::cl100k(), 8191).unwrap();
        assert!(chunker.chunk("").is_empty());
        assert!(chunker.chunk(" \n\t ").is_empty());
    }

    #[test]
    fn long_text_is_split_within_the_token_cap_and_in_order() {
        let chunker = Chunker::new(&source(false, 40, 0), TokenCounter::cl100k(), 8191).unwrap();
        let paragraphs: Vec<String> = (0..20)
            .map(|i| format!("Paragraph {i} talks about topic number {i} in a few plain words."))
            .collect();
        let text = paragraphs.join("\n\n");
        let chunks = chunker.chunk(&text);
        assert!(chunks.len() > 2);
        assert!(chunks.iter().all(|c| c.tokens <= 40 && c.tokens > 0));
        let joined: String = chunks
            .iter()
            .map(|c| c.content.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let mut pos = 0;
        for p in &paragraphs {
            let at = joined[pos..]
                .find(p.as_str())
                .expect("every paragraph, in order");
            pos += at + p.len();
        }
    }

    #[test]
    fn single_chunk_keeps_the_text_whole_unless_the_model_cannot_read_it() {
        let chunker = Chunker::new(&source(true, 10, 0), TokenCounter::cl100k(), 60).unwrap();
        let short = "Question: how long is delivery?\nAnswer: three to five days, sometimes more.";
        assert_eq!(chunker.chunk(short).len(), 1);
        let long = short.repeat(10);
        assert!(chunker.chunk(&long).len() > 1);
    }

    #[test]
    fn the_sweep_and_the_daemon_compute_the_same_chunking_fingerprint() {
        let config = config(false, 100, 10);
        let source = config.sources()[0].clone();
        let chunker =
            Chunker::new(&source, TokenCounter::cl100k(), config.model_token_limit()).unwrap();
        assert_eq!(chunker.fingerprint(), fingerprint_for(&source, &config));
        let mut other = source.clone();
        other.chunk_tokens -= 1;
        assert_ne!(
            fingerprint_for(&other, &config),
            fingerprint_for(&source, &config)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Any text, including odd Unicode and control characters: no panic, every
        /// chunk within the token cap, non-empty, trimmed, found in the text in order,
        /// and no non-blank character of the text lost.
        #[test]
        fn chunks_cover_the_text_in_order_within_the_cap(
            text in "(\\PC|[ \n\t]|😀|e\u{301}|שלום|\u{200d}){0,400}",
            tokens in 8usize..64,
            single in proptest::bool::ANY,
        ) {
            let chunker = Chunker::new(&source(single, tokens, tokens / 8), TokenCounter::cl100k(), 60).unwrap();
            let chunks = chunker.chunk(&text);
            let mut from = 0;
            for c in &chunks {
                proptest::prop_assert!(!c.content.is_empty());
                proptest::prop_assert_eq!(c.content.trim(), c.content.as_str());
                let cap = if single && chunks.len() == 1 { 60 } else { tokens.min(60) };
                proptest::prop_assert!(c.tokens <= cap, "{} tokens > {cap}", c.tokens);
                let at = text[from..].find(c.content.as_str());
                proptest::prop_assert!(at.is_some(), "chunk {:?} not found in order", c.content);
                // Overlap: the next chunk may start inside this one.
                from += at.unwrap_or(0);
                proptest::prop_assert_eq!(c.hash, content_hash(&c.content));
            }
            // Coverage: the text's non-blank characters, in order, are a subsequence of
            // the chunks' (overlaps repeat some; none may be lost).
            let joined: String = chunks.iter().map(|c| c.content.as_str()).collect();
            let mut rest = joined.chars().filter(|c| !c.is_whitespace());
            for ch in text.chars().filter(|c| !c.is_whitespace()) {
                proptest::prop_assert!(rest.any(|c| c == ch), "{:?} lost from the chunks", ch);
            }
            proptest::prop_assert_eq!(chunks.is_empty(), text.trim().is_empty());
        }
    }

    #[test]
    fn equal_text_has_equal_hash() {
        assert_eq!(content_hash("a"), content_hash("a"));
        assert_ne!(content_hash("a"), content_hash("b"));
    }
}
