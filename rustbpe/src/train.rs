//! BPE training: count distinct chunks as text streams in, then learn merges.
//!
//! Memory grows with the number of *distinct* chunks, not with the corpus: each batch of documents
//! is split and counted in parallel, folded into one table of chunk -> count, and dropped.
//!
//! The merge loop keeps, for every adjacent pair of token ids, its weighted count and the list of
//! words it occurs in, plus a max-heap of (count, pair). A merge only touches the words that hold
//! the merged pair, and pushes heap entries only for the pairs it creates. Counts of pairs that
//! already exist can only go down (a merge creates pairs that contain the new id, and removes
//! others), so stale heap entries always over-state a count: we pop, compare with the live count
//! and re-push when they differ (lazy deletion), which makes every pop exact.
//!
//! Tie-break (documented, and what the Python reference in tests/ implements): among pairs with the
//! highest count, merge the one with the smallest (left id, right id). Because counts do not depend
//! on thread count, batch size or hash order, neither does the result.
//!
//! A merge whose bytes equal an existing token's (possible when different words segment the same
//! string differently) is skipped: every token's bytes stay unique, which tiktoken requires.

use crate::pretok::Splitter;
use ahash::{AHashMap, AHashSet};
use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

pub type Pair = (u32, u32);

/// Distinct pre-split chunks and how often each occurred.
pub struct ChunkCounter {
    splitter: Splitter,
    counts: AHashMap<String, u64>,
    pub num_chars: u64,
}

impl ChunkCounter {
    pub fn new(splitter: Splitter) -> Self {
        ChunkCounter { splitter, counts: AHashMap::new(), num_chars: 0 }
    }

    /// Splits and counts one batch of documents in parallel, then folds it into the totals.
    pub fn add_batch(&mut self, docs: &[String]) -> Result<(), String> {
        let splitter = &self.splitter;
        let local = docs
            .par_iter()
            .try_fold(AHashMap::<&str, u64>::new, |mut counts, doc| {
                splitter.split(doc, |chunk| *counts.entry(chunk).or_insert(0) += 1)?;
                Ok::<_, String>(counts)
            })
            .try_reduce(AHashMap::new, |a, b| {
                let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
                for (k, v) in small {
                    *big.entry(k).or_insert(0) += v;
                }
                Ok(big)
            })?;
        for (chunk, n) in local {
            match self.counts.get_mut(chunk) {
                Some(total) => *total += n,
                None => {
                    self.counts.insert(chunk.to_owned(), n);
                }
            }
        }
        self.num_chars += docs.iter().map(|d| d.chars().count() as u64).sum::<u64>();
        Ok(())
    }

    pub fn num_distinct(&self) -> usize {
        self.counts.len()
    }

    pub fn into_counts(self) -> AHashMap<String, u64> {
        self.counts
    }
}

/// The result of training: merges in rank order and every token's bytes (ids 0..255 are bytes).
pub struct Trained {
    pub merges: Vec<Pair>,
    pub vocab: Vec<Vec<u8>>,
}

/// Learns up to `vocab_size - 256` merges from chunk counts. Stops early when no pair is left.
pub fn train(counts: AHashMap<String, u64>, vocab_size: usize) -> Trained {
    assert!(vocab_size >= 256);
    // Sorted, so word indices (and everything downstream) do not depend on hash order.
    let mut items: Vec<(String, u64)> = counts.into_iter().collect();
    items.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let weights: Vec<i64> = items.iter().map(|(_, n)| *n as i64).collect();
    let mut words: Vec<Vec<u32>> = items.into_iter().map(|(s, _)| s.bytes().map(u32::from).collect()).collect();

    let (mut pair_counts, mut pair_words) = count_pairs(&words, &weights);
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> =
        pair_counts.iter().map(|(&p, &c)| (c, Reverse(p))).collect();

    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut known: AHashSet<Vec<u8>> = vocab.iter().cloned().collect();
    let mut merges: Vec<Pair> = Vec::with_capacity(vocab_size - 256);
    let mut delta: AHashMap<Pair, i64> = AHashMap::new();
    let mut created: Vec<Pair> = Vec::new();

    while vocab.len() < vocab_size {
        let Some((count, Reverse(pair))) = heap.pop() else { break };
        let live = pair_counts.get(&pair).copied().unwrap_or(0);
        if live != count {
            if live > 0 {
                heap.push((live, Reverse(pair)));
            }
            continue;
        }
        let (a, b) = pair;
        let mut bytes = vocab[a as usize].clone();
        bytes.extend_from_slice(&vocab[b as usize]);
        if known.contains(&bytes) {
            pair_counts.remove(&pair);
            pair_words.remove(&pair);
            continue;
        }
        let new_id = vocab.len() as u32;
        known.insert(bytes.clone());
        vocab.push(bytes);
        merges.push(pair);

        // Apply the merge to every word that holds the pair; collect the change in pair counts.
        delta.clear();
        for wi in pair_words.remove(&pair).unwrap_or_default() {
            let word = &mut words[wi as usize];
            if !word.windows(2).any(|w| w[0] == a && w[1] == b) {
                continue; // a stale entry: an earlier merge already consumed the pair here
            }
            let weight = weights[wi as usize];
            for w in word.windows(2) {
                *delta.entry((w[0], w[1])).or_insert(0) -= weight;
            }
            merge_in_place(word, a, b, new_id);
            created.clear();
            for w in word.windows(2) {
                *delta.entry((w[0], w[1])).or_insert(0) += weight;
                if w[0] == new_id || w[1] == new_id {
                    created.push((w[0], w[1]));
                }
            }
            created.sort_unstable();
            created.dedup();
            for &p in &created {
                pair_words.entry(p).or_default().push(wi);
            }
        }
        for (p, d) in delta.drain() {
            if d == 0 {
                continue;
            }
            let c = pair_counts.entry(p).or_insert(0);
            *c += d;
            let c = *c;
            if c <= 0 {
                pair_counts.remove(&p);
                pair_words.remove(&p);
            } else if p.0 == new_id || p.1 == new_id {
                heap.push((c, Reverse(p)));
            }
        }
    }
    Trained { merges, vocab }
}

/// Weighted count of every adjacent pair, and the words each pair occurs in (each word once).
fn count_pairs(words: &[Vec<u32>], weights: &[i64]) -> (AHashMap<Pair, i64>, AHashMap<Pair, Vec<u32>>) {
    words
        .par_iter()
        .enumerate()
        .fold(
            || (AHashMap::new(), AHashMap::new()),
            |(mut counts, mut where_): (AHashMap<Pair, i64>, AHashMap<Pair, Vec<u32>>), (wi, word)| {
                for w in word.windows(2) {
                    let p = (w[0], w[1]);
                    *counts.entry(p).or_insert(0) += weights[wi];
                    let list = where_.entry(p).or_default();
                    if list.last() != Some(&(wi as u32)) {
                        list.push(wi as u32);
                    }
                }
                (counts, where_)
            },
        )
        .reduce(
            || (AHashMap::new(), AHashMap::new()),
            |(mut c1, mut w1), (c2, w2)| {
                for (p, c) in c2 {
                    *c1.entry(p).or_insert(0) += c;
                }
                for (p, list) in w2 {
                    w1.entry(p).or_default().extend(list);
                }
                (c1, w1)
            },
        )
}

/// Replaces each non-overlapping occurrence of (a, b), scanning left to right, with `new_id`.
pub fn merge_in_place(word: &mut Vec<u32>, a: u32, b: u32, new_id: u32) {
    let n = word.len();
    let (mut read, mut write) = (0, 0);
    while read < n {
        if read + 1 < n && word[read] == a && word[read + 1] == b {
            word[write] = new_id;
            read += 2;
        } else {
            word[write] = word[read];
            read += 1;
        }
        write += 1;
    }
    word.truncate(write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretok::DEFAULT_PATTERN;

    fn train_docs(docs: &[&str], vocab_size: usize, batch: usize) -> Trained {
        let mut counter = ChunkCounter::new(Splitter::new(DEFAULT_PATTERN).unwrap());
        let docs: Vec<String> = docs.iter().map(|s| s.to_string()).collect();
        for b in docs.chunks(batch) {
            counter.add_batch(b).unwrap();
        }
        train(counter.into_counts(), vocab_size)
    }

    #[test]
    fn merge_in_place_is_left_to_right_and_non_overlapping() {
        let mut w = vec![1, 1, 1, 2, 1, 1];
        merge_in_place(&mut w, 1, 1, 9);
        assert_eq!(w, vec![9, 1, 2, 9]);
    }

    #[test]
    fn first_merge_is_the_most_frequent_pair_with_smallest_ids_on_ties() {
        // (c, d) x3 and (a, b) x3 tie above (x, y) x2; (a, b) has the smaller ids, so it goes first.
        let t = train_docs(&["cd", "ab", "xy", "cd", "ab", "xy", "cd", "ab"], 259, 1);
        let ids = |s: &[u8]| (s[0] as u32, s[1] as u32);
        assert_eq!(t.merges, vec![ids(b"ab"), ids(b"cd"), ids(b"xy")]);
    }

    #[test]
    fn result_is_independent_of_batch_size_and_threads() {
        let docs: Vec<String> = (0..300).map(|i| format!("doc {i}: the quick brown fox {} jumps", i * 7919)).collect();
        let refs: Vec<&str> = docs.iter().map(|s| s.as_str()).collect();
        let a = train_docs(&refs, 400, 1);
        let b = train_docs(&refs, 400, 64);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let c = pool.install(|| train_docs(&refs, 400, 300));
        assert_eq!(a.merges, b.merges);
        assert_eq!(a.merges, c.merges);
        assert_eq!(a.vocab, c.vocab);
    }

    #[test]
    fn token_bytes_are_unique_and_merges_stop_when_nothing_is_left() {
        let t = train_docs(&["aaaa aaaa"], 100_000, 1);
        let unique: AHashSet<&Vec<u8>> = t.vocab.iter().collect();
        assert_eq!(unique.len(), t.vocab.len());
        assert!(t.vocab.len() < 300);
    }
}
