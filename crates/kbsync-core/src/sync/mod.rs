//! From a queued key to the knowledge table: the source row read (`source_rows`), its
//! text cut into chunks (`chunk`, `chunk_texts`), the chunks embedded (`embed`, paced by
//! `rate_limit`), and written (`knowledge`); sources no batch can get through are
//! recorded (`source_problems`).

pub mod chunk;
pub mod chunk_texts;
pub mod embed;
pub mod knowledge;
pub mod rate_limit;
pub mod source_problems;
pub mod source_rows;
