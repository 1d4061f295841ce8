//! Progress reporting for transfers. Callers pass a callback (the CLI prints, the operator can
//! update a status field); large files are also logged through `tracing` at coarse steps so a
//! slow model download is visible in pod logs without a callback.

use std::sync::Arc;

/// One progress report for one object.
#[derive(Clone, Debug)]
pub struct ProgressEvent<'a> {
    /// The object being transferred.
    pub uri: &'a str,
    /// Bytes transferred so far.
    pub bytes_done: u64,
    /// Total size, when known.
    pub bytes_total: Option<u64>,
}

/// A progress callback; it must be cheap, it is called from the transfer loop.
pub type ProgressFn = Arc<dyn Fn(&ProgressEvent<'_>) + Send + Sync>;

/// Files at least this large get `tracing` progress lines.
const LOG_THRESHOLD: u64 = 64 << 20;
/// Callback granularity: report at most once per this many bytes (and at the end).
const CALLBACK_STEP: u64 = 4 << 20;

/// Tracks one transfer and decides when to report.
pub(crate) struct Tracker<'a> {
    uri: &'a str,
    total: Option<u64>,
    done: u64,
    last_callback: u64,
    last_logged_tenth: u64,
    callback: Option<&'a ProgressFn>,
}

impl<'a> Tracker<'a> {
    pub(crate) fn new(uri: &'a str, total: Option<u64>, callback: Option<&'a ProgressFn>) -> Self {
        Self {
            uri,
            total,
            done: 0,
            last_callback: 0,
            last_logged_tenth: 0,
            callback,
        }
    }

    pub(crate) fn advance(&mut self, n: u64) {
        self.done += n;
        if let Some(cb) = self.callback {
            if self.done - self.last_callback >= CALLBACK_STEP {
                self.last_callback = self.done;
                cb(&self.event());
            }
        }
        if let Some(total) = self.total.filter(|t| *t >= LOG_THRESHOLD) {
            let tenth = self.done * 10 / total;
            if tenth > self.last_logged_tenth {
                self.last_logged_tenth = tenth;
                tracing::info!(uri = self.uri, done = self.done, total, "transfer {}%", tenth * 10);
            }
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(cb) = self.callback {
            cb(&self.event());
        }
    }

    fn event(&self) -> ProgressEvent<'a> {
        ProgressEvent {
            uri: self.uri,
            bytes_done: self.done,
            bytes_total: self.total,
        }
    }
}
