//! Learning rate: linear warmup from 0, then cosine decay to a floor, per stage (DESIGN §4).

use std::f64::consts::PI;

use super::config::StageConfig;

/// The learning rate at `step` (0-based, within the stage): `peak * (step + 1) / warmup` during warmup,
/// then `floor + (peak - floor) * (1 + cos(pi * t)) / 2` with `t` going from 0 to 1 over the remaining steps.
pub fn learning_rate(stage: &StageConfig, step: u64) -> f64 {
    let peak = stage.peak_lr();
    if step < stage.warmup {
        return peak * (step + 1) as f64 / stage.warmup as f64;
    }
    let floor = peak * stage.min_lr_ratio;
    let decay = (stage.steps - stage.warmup).max(1);
    let t = ((step - stage.warmup) as f64 / decay as f64).min(1.0);
    floor + (peak - floor) * 0.5 * (1.0 + (PI * t).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::TrainConfig;

    #[test]
    fn warmup_then_cosine_at_chosen_steps() {
        let mut s = TrainConfig::quick().stages[0].clone();
        (s.steps, s.warmup, s.lr, s.batch, s.accumulate, s.min_lr_ratio) = (110, 10, 0.256, 50, 2, 0.1);
        let peak = 0.256 * 100.0 / 256.0; // batch scaling: 0.1
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12 * b.abs().max(1.0);
        assert!(close(learning_rate(&s, 0), peak / 10.0));
        assert!(close(learning_rate(&s, 4), peak / 2.0));
        assert!(close(learning_rate(&s, 9), peak));
        assert!(close(learning_rate(&s, 10), peak)); // cosine starts at the peak
        assert!(close(learning_rate(&s, 60), 0.01 + 0.09 * 0.5)); // half way: floor + half the range
        assert!(close(learning_rate(&s, 110), 0.01)); // the floor at the end
        assert!(learning_rate(&s, 35) > learning_rate(&s, 36));
    }
}
