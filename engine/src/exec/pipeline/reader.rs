//! The read stage: on a thread of its own, loads a unit's windows of inputs
//! in order ([`read::load`]: local files mapped, remote ranges fetched), one
//! window ahead of the compute stage, or, without read-ahead, each window only
//! when the compute stage asks for it. A tensor streamed under the memory
//! budget is not loaded here: it is read as it computes.
//!
//! The compute stage holds the other end, [`Windows`]: the `loaded` channel
//! (a rendezvous: the reader waits until its window is taken) and, without
//! read-ahead, the `requests` channel.

use crate::exec::{guard, read, ExecError, ExecLimits, Progress};
use crate::storage::StorageError;
use crate::unit::OutputTensor;
use std::ops::Range;
use std::sync::mpsc;
use std::thread::Scope;

/// A window as the read stage hands it on: its inputs, `None` for a streamed
/// tensor, or the error (or panic) that ended the stage.
type LoadedWindow = Result<Option<read::Loaded>, ExecError>;

/// Why the read stage stopped before `t`: the unit was cancelled.
fn cancelled(t: &OutputTensor) -> ExecError {
    StorageError::Cancelled {
        location: t.name.clone(),
    }
    .into()
}

/// The compute stage's end of the read stage.
pub(super) struct Windows {
    loaded: mpsc::Receiver<LoadedWindow>,
    /// Without read-ahead: one request per window before it is loaded.
    requests: Option<mpsc::Sender<()>>,
}

impl Windows {
    /// Starts the read stage on `scope`, loading `windows` of `tensors` within
    /// `limits`. The stage ends after the last window, after an error, or once
    /// this end is dropped.
    pub(super) fn spawn<'scope, 'env>(
        scope: &'scope Scope<'scope, 'env>,
        tensors: &'env [OutputTensor],
        windows: &'env [Range<usize>],
        maps: &'env read::Maps,
        limits: &'env ExecLimits,
        progress: &'env dyn Progress,
    ) -> Windows {
        let (loaded_tx, loaded_rx) = mpsc::sync_channel::<LoadedWindow>(0);
        let (requests_tx, requests_rx) = mpsc::channel::<()>();
        let read_ahead = limits.read_ahead;
        scope.spawn(move || {
            let load = || {
                for w in windows {
                    if !read_ahead && requests_rx.recv().is_err() {
                        break;
                    }
                    let ts = &tensors[w.clone()];
                    let loaded = match ts {
                        _ if progress.cancelled() => Err(cancelled(&ts[0])),
                        [t] if limits.streams(t) => Ok(None),
                        _ => read::load(ts, maps, &|n| {
                            progress.read(n);
                            !progress.cancelled()
                        })
                        .map(Some)
                        .map_err(ExecError::from),
                    };
                    let failed = loaded.is_err();
                    if failed {
                        let _ = loaded_tx.send(loaded);
                        return Ok(());
                    }
                    if w.end == tensors.len() {
                        // Loaded, not yet taken: the compute is on the window before.
                        progress.inputs_read();
                    }
                    if loaded_tx.send(loaded).is_err() {
                        break;
                    }
                }
                Ok(())
            };
            // A panic is sent on as the window's error.
            if let Err(e) = guard::catch(load) {
                let _ = loaded_tx.send(Err(e));
            }
        });
        Windows {
            loaded: loaded_rx,
            requests: (!read_ahead).then_some(requests_tx),
        }
    }

    /// The next window's inputs (`None`: a streamed tensor), asking the reader
    /// for it first without read-ahead; `location` (the shard) names the error
    /// when the reader has stopped.
    pub(super) fn next(&self, location: &str) -> Result<Option<read::Loaded>, ExecError> {
        if let Some(requests) = &self.requests {
            let _ = requests.send(());
        }
        match self.loaded.recv() {
            Ok(window) => window,
            Err(_) => Err(StorageError::io(location, "input reader stopped").into()),
        }
    }
}
