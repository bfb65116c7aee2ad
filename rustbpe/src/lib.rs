//! rustbpe: byte-level BPE training for nanochat, fast, streaming and deterministic.
//!
//! The crate knows nothing about chat, files or special tokens: text in, merges out. Encoding in
//! the pipeline is done by tiktoken from the exported ranks; `Bpe::encode` here is the reference
//! that export is tested against.

pub mod pretok;
pub mod train;

#[cfg(feature = "python")]
mod python;

use ahash::AHashMap;
use pretok::Splitter;
use train::Pair;

/// A trained (or empty) byte-level BPE model: split pattern, merges in rank order, token bytes.
pub struct Bpe {
    pub pattern: String,
    pub splitter: Splitter,
    pub merges: Vec<Pair>,
    pub vocab: Vec<Vec<u8>>,
    ranks: AHashMap<Pair, u32>,
}

impl Bpe {
    pub fn new(pattern: &str, merges: Vec<Pair>, vocab: Vec<Vec<u8>>) -> Result<Bpe, String> {
        let splitter = Splitter::new(pattern)?;
        let ranks = merges.iter().enumerate().map(|(i, &p)| (p, 256 + i as u32)).collect();
        Ok(Bpe { pattern: pattern.to_string(), splitter, merges, vocab, ranks })
    }

    /// Encodes text: split into chunks, then within each chunk repeatedly apply the
    /// lowest-ranked merge present, exactly in the order the merges were learned.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut ids: Vec<u32> = Vec::new();
        self.splitter.split(text, |chunk| {
            ids.clear();
            ids.extend(chunk.bytes().map(u32::from));
            while ids.len() > 1 {
                let best = ids
                    .windows(2)
                    .filter_map(|w| self.ranks.get(&(w[0], w[1])).map(|&r| (r, w[0], w[1])))
                    .min();
                let Some((new_id, a, b)) = best else { break };
                train::merge_in_place(&mut ids, a, b, new_id);
            }
            out.extend_from_slice(&ids);
        })?;
        Ok(out)
    }
}
