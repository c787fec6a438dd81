//! Streaming one tensor too large for the memory budget: its inputs are read a
//! segment of rows at a time (local files: mapped ahead of use and unmapped after
//! it; remote objects: one range request per input per segment) and its output
//! goes to the writer a segment at a time, so memory holds one segment, however
//! large the tensor. The methods' chunked helpers drive it (see
//! [`Segments`]): a method that needs whole-tensor statistics reads the tensor
//! once per pass. A vocabulary tensor's segments are its inputs' aligned rows,
//! read and aligned for the segment (`vocab.rs`).

use super::read::Maps;
use super::vocab::{self, VocabSource};
use crate::methods::lora::LoraFactors;
use crate::methods::{chunked, Segments};
use crate::storage::StorageError;
use crate::unit::{OutputTensor, TensorRef, VocabAlignment};
use std::ops::Range;
use std::sync::Mutex;

/// Input elements per segment so that one segment's inputs take about
/// `window_bytes`.
pub fn segment_elements(t: &OutputTensor, window_bytes: u64) -> usize {
    // A vocabulary tensor's segments are aligned inputs, in their aligned dtype.
    let dtype = |r: &TensorRef| match t.vocab {
        Some(_) => vocab::aligned_dtype(r),
        None => r.dtype,
    };
    let per_element: u64 = t.inputs.iter().map(|r| dtype(r).size() as u64).sum();
    (window_bytes / per_element.max(1)).max(1) as usize
}

/// The most elements a segment of `t` may hold: what the kernels' chunk sizes
/// round `elements` up to at worst.
pub fn max_segment_elements(t: &OutputTensor, elements: usize) -> usize {
    let row = t.shape.last().copied().unwrap_or(1).max(1) as usize;
    elements
        .max(chunked::CHUNK)
        .max(chunked::row_chunk(row))
        .min(t.numel() as usize)
}

/// The [`Segments`] source of one streamed tensor.
pub struct Stream<'a> {
    refs: &'a [TensorRef],
    maps: &'a Maps,
    elements: usize,
    emit: &'a (dyn Fn(&[u8]) -> Result<(), StorageError> + Sync),
    error: Mutex<Option<StorageError>>,
    emitted: Mutex<u64>,
    /// A vocabulary tensor's inputs, aligned.
    vocab: Option<VocabSource<'a>>,
    /// Asked before each segment: whether the unit was cancelled.
    cancelled: Option<&'a (dyn Fn() -> bool + Sync)>,
}

impl<'a> Stream<'a> {
    /// Streams the inputs `refs` (not their scales) in segments of about
    /// `elements`, handing output segments to `emit`.
    pub fn new(
        refs: &'a [TensorRef],
        maps: &'a Maps,
        elements: usize,
        emit: &'a (dyn Fn(&[u8]) -> Result<(), StorageError> + Sync),
    ) -> Self {
        Stream {
            refs,
            maps,
            elements,
            emit,
            error: Mutex::new(None),
            emitted: Mutex::new(0),
            vocab: None,
            cancelled: None,
        }
    }

    /// Stops before the next segment, with [`StorageError::Cancelled`], once
    /// `cancelled` says so.
    pub fn cancel_when(self, cancelled: &'a (dyn Fn() -> bool + Sync)) -> Self {
        Stream {
            cancelled: Some(cancelled),
            ..self
        }
    }

    /// Streams the vocabulary tensor `t`, its inputs re-indexed by `v`: each
    /// segment is its inputs' aligned rows (see [`VocabSource`]), an adapted
    /// input's adapted by its `factors` (per input).
    pub fn vocab(
        t: &'a OutputTensor,
        v: &'a VocabAlignment,
        maps: &'a Maps,
        factors: Vec<Option<LoraFactors>>,
        elements: usize,
        emit: &'a (dyn Fn(&[u8]) -> Result<(), StorageError> + Sync),
    ) -> Self {
        Stream {
            vocab: Some(VocabSource::new(t, v, maps, factors, elements)),
            ..Stream::new(&t.inputs, maps, elements, emit)
        }
    }

    /// The first error met, and the output bytes emitted.
    pub fn finish(self) -> (Option<StorageError>, u64) {
        let error = self.error.into_inner().unwrap_or_else(|e| e.into_inner());
        let emitted = self.emitted.into_inner().unwrap_or_else(|e| e.into_inner());
        (error, emitted)
    }

    fn failed(&self) -> bool {
        self.error.lock().map_or(true, |e| e.is_some())
    }

    fn fail(&self, err: StorageError) {
        if let Ok(mut e) = self.error.lock() {
            e.get_or_insert(err);
        }
    }

    /// The byte range of elements `range` of input `r`.
    fn bytes_of(r: &TensorRef, range: &Range<usize>) -> Range<u64> {
        let size = r.dtype.size() as u64;
        r.offset + range.start as u64 * size..r.offset + range.end as u64 * size
    }

    /// Reads elements `range` of every input: local ones mapped (and made
    /// resident), remote ones fetched at the same time.
    fn read(&self, range: &Range<usize>) -> Result<Vec<Input<'a>>, StorageError> {
        if self.cancelled.is_some_and(|c| c()) {
            return Err(StorageError::Cancelled {
                location: self
                    .refs
                    .first()
                    .map_or(String::new(), |r| r.location.clone()),
            });
        }
        if let Some(v) = &self.vocab {
            let aligned = v.read(range.clone())?;
            return Ok(aligned.into_iter().map(Input::Fetched).collect());
        }
        let mut inputs = Vec::with_capacity(self.refs.len());
        for r in self.refs {
            let bytes = Self::bytes_of(r, range);
            match self.maps.get(r) {
                Some(m) => {
                    let b = m.bytes(bytes.clone())?;
                    m.prefetch(bytes);
                    inputs.push(Input::Mapped(b));
                }
                None => inputs.push(Input::Fetched(Vec::new())),
            }
        }
        let remote: Vec<usize> = (0..self.refs.len())
            .filter(|&i| matches!(inputs[i], Input::Fetched(_)))
            .collect();
        let ranges: Vec<(&str, Range<u64>)> = remote
            .iter()
            .map(|&i| {
                let r = &self.refs[i];
                (r.location.as_str(), Self::bytes_of(r, range))
            })
            .collect();
        let fetched = super::read::fetch_all(&ranges, &|_| true);
        for (&i, data) in remote.iter().zip(fetched) {
            inputs[i] = Input::Fetched(data?);
        }
        Ok(inputs)
    }
}

enum Input<'a> {
    Mapped(&'a [u8]),
    Fetched(Vec<u8>),
}

impl Segments for Stream<'_> {
    fn elements(&self) -> usize {
        self.elements
    }

    fn with_inputs(&self, range: Range<usize>, f: &mut dyn FnMut(&[&[u8]])) {
        let read = if self.failed() {
            None
        } else {
            match self.read(&range) {
                Ok(inputs) => Some(inputs),
                Err(e) => {
                    self.fail(e);
                    None
                }
            }
        };
        match &read {
            Some(inputs) => {
                let slices: Vec<&[u8]> = inputs
                    .iter()
                    .map(|i| match i {
                        Input::Mapped(b) => *b,
                        Input::Fetched(v) => v.as_slice(),
                    })
                    .collect();
                f(&slices)
            }
            None => {
                // Failed: zeros, so the method runs out harmlessly (in the
                // dtype the method reads: a vocabulary tensor's aligned one).
                let zeros: Vec<Vec<u8>> = self
                    .refs
                    .iter()
                    .map(|r| {
                        let dtype = match self.vocab {
                            Some(_) => vocab::aligned_dtype(r),
                            None => r.dtype,
                        };
                        vec![0u8; range.len() * dtype.size()]
                    })
                    .collect();
                let slices: Vec<&[u8]> = zeros.iter().map(Vec::as_slice).collect();
                f(&slices)
            }
        }
        if self.vocab.is_some() {
            return; // its rows were released once aligned
        }
        for r in self.refs {
            if let Some(m) = self.maps.get(r) {
                m.release(Self::bytes_of(r, &range));
            }
        }
    }

    fn emit(&self, bytes: &[u8]) {
        if self.failed() {
            return;
        }
        match (self.emit)(bytes) {
            Ok(()) => {
                if let Ok(mut n) = self.emitted.lock() {
                    *n += bytes.len() as u64;
                }
            }
            Err(e) => self.fail(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::unit::{OutputTensor, TensorOp};

    fn tensor(location: &str, numel: u64) -> OutputTensor {
        OutputTensor {
            name: "w".into(),
            dtype: DType::BF16,
            shape: vec![numel],
            op: TensorOp::Merge,
            inputs: vec![TensorRef {
                model: 0,
                name: "w".into(),
                location: location.into(),
                offset: 0,
                len: numel * 2,
                dtype: DType::BF16,
                shape: vec![numel],
                lora: None,
            }],
            base: None,
            params: Default::default(),
            scales: Vec::new(),
            block: None,
            requant: None,
            packed: None,
            vocab: None,
        }
    }

    #[test]
    fn segments_read_their_own_bytes_and_a_short_file_is_an_error_not_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let bytes: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let location = path.to_str().unwrap();
        let sink = |_: &[u8]| Ok(());

        let t = tensor(location, 2000);
        let maps = Maps::open(std::slice::from_ref(&t)).unwrap();
        let stream = Stream::new(&t.inputs, &maps, 500, &sink);
        let mut seen = Vec::new();
        stream.with_inputs(500..1000, &mut |ins| seen.extend_from_slice(ins[0]));
        assert_eq!(seen, &bytes[1000..2000]);
        assert!(stream.finish().0.is_none());

        // The plan says 3000 elements, the file holds 2000: the segment past
        // the end fails, the method sees zeros, and the error is kept.
        let t = tensor(location, 3000);
        let maps = Maps::open(std::slice::from_ref(&t)).unwrap();
        let stream = Stream::new(&t.inputs, &maps, 1000, &sink);
        let mut seen = Vec::new();
        stream.with_inputs(2000..3000, &mut |ins| seen.extend_from_slice(ins[0]));
        assert!(seen.iter().all(|&b| b == 0) && seen.len() == 2000);
        stream.emit(&[1, 2, 3]);
        let (error, emitted) = stream.finish();
        assert!(error.is_some());
        assert_eq!(emitted, 0, "nothing is emitted after a failure");
    }
}
