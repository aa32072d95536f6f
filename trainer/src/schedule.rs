//! Learning-rate schedules with the semantics of Hugging Face `transformers.get_scheduler`:
//! the multiplier of optimizer step `step` (0-based, the step about to be taken) is
//! `lr_lambda(step)`, exactly as `LambdaLR` evaluates it.

/// `--lr-scheduler-type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Linear warm-up from 0, then linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Linear warm-up, then half a cosine period from the peak to 0 at the last step.
    Cosine,
    /// The peak rate throughout; warm-up is ignored (as HF's `constant`).
    Constant,
    /// Linear warm-up, then the peak rate.
    #[value(name = "constant_with_warmup", alias = "constant-with-warmup")]
    ConstantWithWarmup,
}

/// HF `TrainingArguments.get_warmup_steps`: `warmup_steps` when positive, otherwise
/// `ceil(total_steps * warmup_ratio)`.
#[must_use]
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total_steps: usize) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (total_steps as f64 * warmup_ratio).ceil() as usize
    }
}

/// The learning rate of 0-based optimizer step `step` for a peak rate `lr`.
#[must_use]
pub fn learning_rate(kind: LrSchedulerType, lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
    let warming = step < warmup;
    let warm = step as f64 / warmup.max(1) as f64;
    let factor = match kind {
        LrSchedulerType::Constant => 1.0,
        LrSchedulerType::ConstantWithWarmup if warming => warm,
        LrSchedulerType::ConstantWithWarmup => 1.0,
        _ if warming => warm,
        LrSchedulerType::Linear => {
            (total.saturating_sub(step) as f64 / total.saturating_sub(warmup).max(1) as f64).max(0.0)
        }
        LrSchedulerType::Cosine => {
            let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
            // num_cycles = 0.5: half a period, from 1 down to 0.
            (0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * progress).cos())).max(0.0)
        }
    };
    lr * factor
}

/// HF's `get_linear_schedule_with_warmup`: linear warm-up to `lr`, then linear decay to zero at
/// `total` steps. `step` is the 0-based optimizer step about to be taken.
#[must_use]
pub fn linear_schedule(lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
    learning_rate(LrSchedulerType::Linear, lr, step, warmup, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn linear_schedule_warms_up_then_decays_to_zero() {
        assert_eq!(linear_schedule(1.0, 0, 2, 10), 0.0);
        assert_eq!(linear_schedule(1.0, 1, 2, 10), 0.5);
        assert_eq!(linear_schedule(1.0, 2, 2, 10), 1.0);
        assert_eq!(linear_schedule(1.0, 6, 2, 10), 0.5);
        assert_eq!(linear_schedule(1.0, 10, 2, 10), 0.0);
        assert_eq!(linear_schedule(2.0, 0, 0, 4), 2.0);
    }

    #[test]
    fn cosine_matches_hf_formula() {
        // total 10, warmup 2, lr 2: warmup 0, 1; then 0.5 * (1 + cos(pi * (s - 2) / 8)) * 2.
        let lr = 2.0;
        assert_eq!(learning_rate(LrSchedulerType::Cosine, lr, 0, 2, 10), 0.0);
        assert_eq!(learning_rate(LrSchedulerType::Cosine, lr, 1, 2, 10), 1.0);
        assert_eq!(learning_rate(LrSchedulerType::Cosine, lr, 2, 2, 10), 2.0);
        // s = 4: progress 0.25, cos(pi/4) = 0.70710678...: 0.5 * 1.70710678 * 2 = 1.70710678.
        assert!(close(learning_rate(LrSchedulerType::Cosine, lr, 4, 2, 10), 1.707_106_781_186_547_5));
        // s = 6: midpoint, half the peak.
        assert!(close(learning_rate(LrSchedulerType::Cosine, lr, 6, 2, 10), 1.0));
        // s = 8: progress 0.75, cos(3pi/4) = -0.70710678: 0.29289322.
        assert!(close(learning_rate(LrSchedulerType::Cosine, lr, 8, 2, 10), 0.292_893_218_813_452_5));
        assert!(learning_rate(LrSchedulerType::Cosine, lr, 10, 2, 10).abs() < 1e-15);
        // No warm-up: starts at the peak.
        assert_eq!(learning_rate(LrSchedulerType::Cosine, lr, 0, 0, 4), 2.0);
    }

    #[test]
    fn constant_schedules() {
        for s in 0..5 {
            assert_eq!(learning_rate(LrSchedulerType::Constant, 3.0, s, 3, 5), 3.0);
        }
        let v: Vec<f64> = (0..5).map(|s| learning_rate(LrSchedulerType::ConstantWithWarmup, 3.0, s, 3, 5)).collect();
        assert_eq!(v, vec![0.0, 1.0, 2.0, 3.0, 3.0]);
    }

    #[test]
    fn warmup_steps_win_over_ratio() {
        assert_eq!(warmup_steps(5, 0.5, 100), 5);
        assert_eq!(warmup_steps(0, 0.1, 100), 10);
        // ceil, as HF: 0.1 * 15 = 1.5 -> 2.
        assert_eq!(warmup_steps(0, 0.1, 15), 2);
        assert_eq!(warmup_steps(0, 0.0, 15), 0);
    }
}
