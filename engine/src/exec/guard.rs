//! Panics inside a unit's pipeline (reader, compute threads, GPU path, writer)
//! become the unit's error, [`ExecError::Internal`], instead of ending a
//! thread silently or leaving the others waiting on its channels: every pipeline
//! thread runs under [`catch`], and the unit as a whole too.
//!
//! A panic's payload holds its message but not its location; a panic hook
//! (installed once, in front of the previous one, which still prints the panic
//! as before) remembers the location of the last few panics by message, so the
//! error reads `internal error (a bug): panicked at FILE:LINE:COL: MESSAGE`.

use super::ExecError;
use std::any::Any;
use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, Once};

/// Locations of recent panics, by message (most recent last).
static RECENT: Mutex<VecDeque<(String, String)>> = Mutex::new(VecDeque::new());
const REMEMBERED: usize = 32;

fn message(payload: &dyn Any) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Installs the location-recording panic hook (once per process).
pub(crate) fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if let Some(at) = info.location() {
                let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
                if recent.len() == REMEMBERED {
                    recent.pop_front();
                }
                recent.push_back((message(info.payload()), at.to_string()));
            }
            previous(info);
        }));
    });
}

/// The error for a caught panic.
pub(crate) fn internal(payload: Box<dyn Any + Send>) -> ExecError {
    let message = message(&*payload);
    let at = RECENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .rev()
        .find(|(m, _)| *m == message)
        .map(|(_, at)| at.clone())
        .unwrap_or_else(|| "an unknown place".into());
    ExecError::Internal(format!("panicked at {at}: {message}"))
}

/// Runs `f`, turning a panic into [`ExecError::Internal`].
pub(crate) fn catch<T>(f: impl FnOnce() -> Result<T, ExecError>) -> Result<T, ExecError> {
    install_hook();
    panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(internal(p)))
}
