//! The progress bar the binary draws when stderr is a terminal: steps done of the total, loss,
//! tokens/s and the time left. Pods and CI have no terminal and get JSON log lines only.
//!
//! Log lines and the bar share stderr, so log lines go through [`TerminalProgress::log_writer`],
//! which clears the bar, writes the line and redraws the bar below it: a line never lands in
//! the middle of the bar.

use crate::train::{ProgressObserver, StepProgress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::sync::{Arc, Mutex};
use tracing_subscriber::fmt::MakeWriter;

/// Where log lines go; stderr in the binary.
pub type LogSink = Arc<dyn Fn() -> Box<dyn Write> + Send + Sync>;

pub struct TerminalProgress {
    bar: ProgressBar,
    /// Where the bar is drawn once training starts. Until then it is hidden, so that loading
    /// the model and the data shows log lines only, not an empty bar.
    target: Mutex<Option<ProgressDrawTarget>>,
    sink: LogSink,
}

/// Elapsed time, bar, `step/total`, then the message (loss, tokens/s) and the time left.
const TEMPLATE: &str = "{elapsed_precise} [{wide_bar}] {pos}/{len} steps, {msg}, ETA {eta}";

impl TerminalProgress {
    /// A bar on stderr, with log lines on stderr too.
    pub fn stderr() -> Arc<Self> {
        Self::new(ProgressDrawTarget::stderr(), Arc::new(|| Box::new(std::io::stderr())))
    }

    pub fn new(target: ProgressDrawTarget, sink: LogSink) -> Arc<Self> {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        // The template is a constant that the tests render; the fallback only guards a future
        // indicatif that reads it differently.
        let style = ProgressStyle::with_template(TEMPLATE).unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        Arc::new(Self {
            bar,
            target: Mutex::new(Some(target)),
            sink,
        })
    }

    /// A `tracing_subscriber` writer that prints each log line above the bar.
    pub fn log_writer(&self) -> BarLogWriter {
        BarLogWriter {
            bar: self.bar.clone(),
            sink: self.sink.clone(),
        }
    }

    /// Leaves the bar where the run stopped (done, stopped early or failed) and stops drawing
    /// it, so later log lines print below it.
    pub fn finish(&self) {
        self.bar.abandon();
        self.bar.set_draw_target(ProgressDrawTarget::hidden());
    }
}

impl ProgressObserver for TerminalProgress {
    fn start(&self, step: u64, total_steps: u64) {
        self.bar.set_length(total_steps);
        self.bar.set_position(step);
        // Rate and elapsed time count from here, not from the steps of an earlier run.
        self.bar.reset_elapsed();
        let target = self
            .target
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(target) = target {
            self.bar.set_draw_target(target);
        }
        self.bar.tick();
    }

    fn step(&self, p: &StepProgress) {
        self.bar
            .set_message(format!("loss {:.4}, {:.0} tok/s", p.loss, p.tokens_per_second));
        self.bar.set_position(p.step);
    }
}

/// See [`TerminalProgress::log_writer`].
#[derive(Clone)]
pub struct BarLogWriter {
    bar: ProgressBar,
    sink: LogSink,
}

impl<'a> MakeWriter<'a> for BarLogWriter {
    type Writer = BarLogLine;

    fn make_writer(&'a self) -> BarLogLine {
        BarLogLine {
            bar: self.bar.clone(),
            sink: self.sink.clone(),
            buf: Vec::new(),
        }
    }
}

/// One formatted log event, held until it is complete so that the bar is cleared and redrawn
/// once per line rather than once per write.
pub struct BarLogLine {
    bar: ProgressBar,
    sink: LogSink,
    buf: Vec<u8>,
}

impl Write for BarLogLine {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BarLogLine {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let buf = std::mem::take(&mut self.buf);
        self.bar.suspend(|| {
            let mut out = (self.sink)();
            // A log line that cannot be written has nowhere to be reported either.
            let _ = out.write_all(&buf).and_then(|()| out.flush());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::TermLike;

    /// A terminal that records what is drawn on it, and log lines, in order.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<Vec<String>>>);

    impl Screen {
        fn push(&self, s: String) {
            self.0.lock().expect("screen").push(s);
        }
        fn events(&self) -> Vec<String> {
            self.0.lock().expect("screen").clone()
        }
        fn sink(&self) -> LogSink {
            let screen = self.clone();
            Arc::new(move || Box::new(LogLines(screen.clone())))
        }
    }

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.push(format!("bar: {s}"));
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if !s.trim().is_empty() {
                self.push(format!("bar: {}", s.trim_end()));
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.push("clear".into());
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct LogLines(Screen);

    impl Write for LogLines {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0
                .push(format!("log: {}", String::from_utf8_lossy(data).trim_end()));
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn step(step: u64) -> StepProgress {
        StepProgress {
            step,
            total_steps: 10,
            loss: 1.23456,
            tokens_per_second: 1234.4,
            epoch: 0.5,
            learning_rate: 1e-3,
        }
    }

    fn progress(screen: &Screen) -> Arc<TerminalProgress> {
        TerminalProgress::new(ProgressDrawTarget::term_like(Box::new(screen.clone())), screen.sink())
    }

    #[test]
    fn the_bar_shows_steps_loss_and_tokens_per_second_once_training_starts() {
        let screen = Screen::default();
        let p = progress(&screen);
        p.log_writer()
            .make_writer()
            .write_all(b"loading the model\n")
            .expect("log");
        assert_eq!(
            screen.events(),
            ["log: loading the model"],
            "no bar before training starts"
        );

        p.start(2, 10);
        p.step(&step(3));
        p.finish();
        let last = screen
            .events()
            .into_iter()
            .rfind(|e| e.starts_with("bar: "))
            .expect("drawn");
        assert!(last.contains(" 3/10 steps, loss 1.2346, 1234 tok/s, ETA "), "{last}");
    }

    #[test]
    fn a_log_line_clears_the_bar_and_the_bar_is_redrawn_below_it() {
        let screen = Screen::default();
        let p = progress(&screen);
        p.start(0, 10);
        p.step(&step(1));
        let before = screen.events().len();
        let mut line = p.log_writer().make_writer();
        line.write_all(b"eval ").expect("write");
        line.write_all(b"loss=2.5\n").expect("write");
        assert_eq!(
            screen.events().len(),
            before,
            "nothing is written before the line is complete"
        );
        drop(line);
        let events = screen.events()[before..].to_vec();
        let log = events
            .iter()
            .position(|e| e == "log: eval loss=2.5")
            .expect("logged once, whole");
        assert!(
            events[..log].iter().any(|e| e == "clear"),
            "the bar is cleared first: {events:?}"
        );
        assert!(
            events[log + 1..].iter().any(|e| e.contains("1/10 steps")),
            "then redrawn: {events:?}"
        );
    }

    #[test]
    fn after_finish_log_lines_no_longer_redraw_the_bar() {
        let screen = Screen::default();
        let p = progress(&screen);
        p.start(0, 10);
        p.step(&step(10));
        p.finish();
        let before = screen.events().len();
        p.log_writer()
            .make_writer()
            .write_all(b"training finished\n")
            .expect("log");
        assert_eq!(screen.events()[before..], ["log: training finished"]);
    }
}
