//! The compute stage, on the unit's own thread: takes each window from the
//! read stage ([`Windows`]), computes its tensors in parallel (rayon) into a
//! free output buffer, and sends the buffer to the write stage
//! ([`OutputBuffers`]); a streamed tensor is computed segment by segment, each
//! segment sent as it is done.

use super::reader::Windows;
use super::writer::OutputBuffers;
use crate::exec::tensor::{compute, compute_loaded, lora_factors};
use crate::exec::{guard, read, stream, Device, ExecError, ExecLimits, Progress};
use crate::methods::MergeMethod;
use crate::storage;
use crate::unit::{OutputTensor, WorkUnit};
use rayon::prelude::*;
use std::ops::Range;

/// What the compute stage works with.
#[derive(Clone, Copy)]
pub(super) struct Compute<'a> {
    pub(super) unit: &'a WorkUnit,
    pub(super) method: &'a dyn MergeMethod,
    pub(super) maps: &'a read::Maps,
    pub(super) limits: &'a ExecLimits,
    pub(super) device: &'a Device,
    pub(super) progress: &'a dyn Progress,
}

impl Compute<'_> {
    /// Computes `windows` (ranges of the unit's tensors) in order, taking
    /// their inputs from `input` and sending their output to `output`. Stops
    /// early when the writer has stopped (its error is the one to report); a
    /// panic is returned as [`ExecError::Internal`].
    pub(super) fn run(
        &self,
        windows: &[Range<usize>],
        input: &Windows,
        output: &OutputBuffers,
    ) -> Result<(), ExecError> {
        let Compute {
            unit,
            method,
            maps,
            device,
            progress,
            ..
        } = *self;
        // A panic here (or in a compute thread: rayon passes it on) ends the
        // unit; the caller drops both stages' ends either way, so the reader
        // and the writer stop.
        guard::catch(|| -> Result<(), ExecError> {
            for w in windows {
                let loaded = input.next(output.location())?;
                let tensors = &unit.tensors[w.clone()];
                let Some(loaded) = loaded else {
                    let t = &tensors[0];
                    self.stream_tensor(t, output)?;
                    progress.read(t.input_bytes());
                    continue;
                };
                let views = loaded.views(tensors, maps)?;
                let len: usize = tensors.iter().map(|t| t.byte_len() as usize).sum();
                let mut buf = output.take(len)?;
                compute_window(unit, method, tensors, &views, &mut buf[..len], device)?;
                drop(views);
                progress.read(loaded.bytes);
                maps.release(tensors);
                if output.send(buf, len).is_err() {
                    // The writer failed; its error is reported by the caller.
                    break;
                }
            }
            Ok(())
        })
    }

    /// Computes `t` in segments (see [`stream`]), each output segment going to
    /// the writer as it is done.
    fn stream_tensor(&self, t: &OutputTensor, output: &OutputBuffers) -> Result<(), ExecError> {
        let Compute {
            unit,
            method,
            maps,
            limits,
            progress,
            ..
        } = *self;
        // Block scales and LoRA factors are small: read whole.
        let scales: Vec<std::borrow::Cow<[u8]>> = t
            .side_refs()
            .map(|r| match maps.get(r) {
                Some(m) => m
                    .bytes(r.offset..r.offset + r.len)
                    .map(std::borrow::Cow::Borrowed),
                None => storage::for_location(&r.location)
                    .read_range(&r.location, r.offset..r.offset + r.len)
                    .map(std::borrow::Cow::Owned),
            })
            .collect::<Result<_, _>>()?;
        let mut inputs: Vec<&[u8]> = vec![&[]; t.inputs.len()];
        inputs.extend(scales.iter().map(|s| &s[..]));
        let elements = stream::segment_elements(t, limits.window_bytes);
        let emit = |bytes: &[u8]| output.emit(bytes);
        let cancelled = || progress.cancelled();
        let source = match &t.vocab {
            // Rows read, adapted and aligned a segment at a time (validated
            // units carry no scales with a vocabulary tensor: the side
            // bytes are LoRA factors).
            Some(v) => {
                let factors = lora_factors(t, &inputs[t.inputs.len()..]);
                stream::Stream::vocab(t, v, maps, factors, elements, &emit)
            }
            None => stream::Stream::new(&t.inputs, maps, elements, &emit),
        }
        .cancel_when(&cancelled);
        let out_len = stream::max_segment_elements(t, elements) * t.dtype.size();
        let mut buf = output.take(out_len)?;
        let computed = compute(
            unit,
            method,
            t,
            &inputs,
            &mut buf[..out_len],
            Some(&source),
            &Device::Cpu,
        );
        output.put(buf);
        let (failed, produced) = source.finish();
        if let Some(e) = failed {
            return Err(e.into());
        }
        computed?;
        if produced != t.byte_len() {
            return Err(ExecError::StreamIncomplete {
                tensor: t.name.clone(),
                produced,
                expected: t.byte_len(),
            });
        }
        Ok(())
    }
}

/// Computes a window's tensors in parallel, each into its slice of `out`.
fn compute_window(
    unit: &WorkUnit,
    method: &dyn MergeMethod,
    tensors: &[OutputTensor],
    inputs: &[read::Inputs],
    mut out: &mut [u8],
    device: &Device,
) -> Result<(), ExecError> {
    let mut slices = Vec::with_capacity(tensors.len());
    for t in tensors {
        let (head, rest) = out.split_at_mut(t.byte_len() as usize);
        slices.push(head);
        out = rest;
    }
    if tensors.len() == 1 {
        return compute_loaded(
            unit,
            method,
            &tensors[0],
            &inputs[0],
            slices.pop().unwrap_or_default(),
            device,
        );
    }
    tensors
        .par_iter()
        .zip(inputs)
        .zip(slices)
        .try_for_each(|((t, ins), o)| compute_loaded(unit, method, t, ins, o, device))
}
