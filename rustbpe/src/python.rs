//! The Python face of the crate (`import rustbpe`), built by maturin with the `python` feature.

use crate::pretok::{Splitter, DEFAULT_PATTERN, GPT4_PATTERN};
use crate::train::{train, ChunkCounter};
use crate::Bpe;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

/// A byte-level BPE tokenizer: train it on an iterator of strings, read its ranks, encode text.
#[pyclass(module = "rustbpe")]
struct Tokenizer {
    bpe: Bpe,
}

fn value_error(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> PyResult<Self> {
        let vocab = (0..=255u8).map(|b| vec![b]).collect();
        Ok(Tokenizer { bpe: Bpe::new(DEFAULT_PATTERN, Vec::new(), vocab).map_err(value_error)? })
    }

    /// Trains on the strings an iterator yields, `buffer_size` at a time: each buffer is split and
    /// counted on all cores with the GIL released. `vocab_size` counts the 256 byte tokens.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None, num_threads=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: usize,
        pattern: Option<String>,
        num_threads: Option<usize>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(value_error(format!(
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            )));
        }
        if buffer_size == 0 {
            return Err(value_error("buffer_size must be at least 1".into()));
        }
        if iterator.is_instance_of::<PyString>() {
            return Err(PyTypeError::new_err(
                "train_from_iterator takes an iterator of strings, not a single string; wrap it in a list",
            ));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(value_error)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads.unwrap_or(0))
            .build()
            .map_err(|e| value_error(format!("could not start the thread pool: {e}")))?;

        let mut counter = ChunkCounter::new(splitter);
        let mut items = iterator.try_iter()?;
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size);
        let mut num_docs: u64 = 0;
        loop {
            buffer.clear();
            for item in items.by_ref().take(buffer_size) {
                let item = item?;
                let text = item.cast::<PyString>().map_err(|_| {
                    let type_name = item.get_type().name().map(|n| n.to_string()).unwrap_or_default();
                    PyTypeError::new_err(format!("train_from_iterator expects str items, got {type_name}"))
                })?;
                buffer.push(text.to_str()?.to_owned());
            }
            if buffer.is_empty() {
                break;
            }
            num_docs += buffer.len() as u64;
            py.detach(|| pool.install(|| counter.add_batch(&buffer))).map_err(value_error)?;
        }
        if num_docs == 0 {
            return Err(value_error("train_from_iterator got an empty iterator: there is no text to train on".into()));
        }
        let trained = py.detach(|| pool.install(|| train(counter.into_counts(), vocab_size as usize)));
        self.bpe = Bpe::new(&pattern, trained.merges, trained.vocab).map_err(value_error)?;
        Ok(())
    }

    fn get_pattern(&self) -> String {
        self.bpe.pattern.clone()
    }

    /// Every token as (bytes, rank), rank = token id: 256 single bytes first, then the merges.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.bpe.vocab.iter().enumerate().map(|(i, b)| (PyBytes::new(py, b), i as u32)).collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.bpe.vocab.len()
    }

    /// The learned merges as (left id, right id), in rank order.
    fn get_merges(&self) -> Vec<(u32, u32)> {
        self.bpe.merges.clone()
    }

    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.detach(|| self.bpe.encode(text)).map_err(value_error)
    }
}

/// The pre-split chunks of `text` under `pattern` (default: DEFAULT_PATTERN).
#[pyfunction]
#[pyo3(signature = (text, pattern=None))]
fn split_text(text: &str, pattern: Option<&str>) -> PyResult<Vec<String>> {
    let splitter = Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN)).map_err(value_error)?;
    let mut chunks = Vec::new();
    splitter.split(text, |c| chunks.push(c.to_string())).map_err(value_error)?;
    Ok(chunks)
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Where this extension was built from: lets the tests prove `import rustbpe` is our crate and
    // not a same-named package from an index.
    m.add("BUILD_MANIFEST_DIR", env!("CARGO_MANIFEST_DIR"))?;
    Ok(())
}
