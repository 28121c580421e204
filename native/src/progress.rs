//! Progress bars for long commands. On a terminal, indicatif's bar; without one (a run under `nohup`, a CI
//! log), where indicatif would draw nothing, the same line printed to stderr when the bar starts and then at
//! most every [`LOG_EVERY`], so a log shows how far a 40-minute `ov3 cache` has got.
//! (`ov3 train` prints its own lines: every 10 steps, stages, evaluations.)

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// How often a bar without a terminal prints its line.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// A bar of `len` steps drawn with indicatif's `template`.
pub fn bar(len: u64, template: &str) -> anyhow::Result<ProgressBar> {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template)?);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::term_like_with_hz(Box::new(LogLines::new(LOG_EVERY, None)), 1));
    }
    Ok(bar)
}

/// A draw target that turns each redraw into one plain line, at most one per `every` (the first at once).
/// indicatif writes a redraw as pieces and flushes it: the pieces gather in `pending`, the flush prints.
#[derive(Debug)]
struct LogLines {
    every: Duration,
    pending: Mutex<String>,
    last: Mutex<Option<Instant>>,
    /// Where the lines go in tests; stderr when `None`.
    capture: Option<Arc<Mutex<Vec<String>>>>,
}

impl LogLines {
    fn new(every: Duration, capture: Option<Arc<Mutex<Vec<String>>>>) -> Self {
        Self { every, pending: Mutex::default(), last: Mutex::default(), capture }
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        100
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
        self.write_str(s)
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.pending.lock().expect("progress lock").push_str(s);
        Ok(())
    }

    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        let line = std::mem::take(&mut *self.pending.lock().expect("progress lock"));
        let line = line.trim();
        let mut last = self.last.lock().expect("progress lock");
        if line.is_empty() || last.is_some_and(|t| t.elapsed() < self.every) {
            return Ok(());
        }
        *last = Some(Instant::now());
        match &self.capture {
            Some(lines) => lines.lock().expect("progress lock").push(line.to_string()),
            None => eprintln!("{line}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(every: Duration) -> Vec<String> {
        let lines = Arc::new(Mutex::new(vec![]));
        let bar = ProgressBar::with_draw_target(
            Some(3),
            ProgressDrawTarget::term_like(Box::new(LogLines::new(every, Some(lines.clone())))),
        );
        bar.set_style(ProgressStyle::with_template("encoding {pos}/{len}").unwrap());
        for _ in 0..3 {
            bar.inc(1);
        }
        bar.finish_and_clear();
        let got = lines.lock().unwrap().clone();
        got
    }

    #[test]
    fn without_a_terminal_a_bar_prints_plain_lines_at_most_once_per_interval() {
        // No interval: every redraw is a line, with no cursor movement or padding in it.
        let all = drive(Duration::ZERO);
        assert!(all.contains(&"encoding 1/3".to_string()) && all.contains(&"encoding 3/3".to_string()), "{all:?}");
        assert!(all.iter().all(|l| l.starts_with("encoding ") && l == l.trim()), "{all:?}");
        // A long interval: the first redraw only.
        assert_eq!(drive(Duration::from_secs(3600)).len(), 1);
    }
}
