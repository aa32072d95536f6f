//! Per-phase step timers for finding where a training step's time goes, on when
//! `BURN_MOE_STEP_TIMERS=1`: at each phase boundary the device is synced, so a phase's wall time
//! includes the GPU work it queued. Off (the default), a mark costs nothing and syncs nothing.
//! Also [`sync_check`] (`BURN_MOE_SYNC_CHECK=1`), which finds where a kernel failed.

use std::time::Instant;

use burn::tensor::backend::Backend;

/// Wall time per named phase of one step, summed over micro-batches.
pub struct StepTimers<'a, B: Backend> {
    device: &'a B::Device,
    last: Option<Instant>,
    phases: Vec<(&'static str, f64)>,
}

impl<'a, B: Backend> StepTimers<'a, B> {
    /// Timers for `device`, on when `BURN_MOE_STEP_TIMERS=1`.
    pub fn from_env(device: &'a B::Device) -> Self {
        let on = std::env::var("BURN_MOE_STEP_TIMERS").is_ok_and(|v| v == "1");
        Self { device, last: on.then(Instant::now), phases: Vec::new() }
    }

    /// Starts a step: the time since the previous mark is not counted.
    pub fn start(&mut self) {
        if self.last.is_some() {
            let _ = B::sync(self.device);
            self.last = Some(Instant::now());
            self.phases.clear();
        }
    }

    /// Ends phase `name` (added to its earlier time in this step).
    pub fn mark(&mut self, name: &'static str) {
        let Some(last) = self.last else { return };
        if let Err(e) = B::sync(self.device) {
            tracing::error!(phase = name, "the device reported an error during this phase: {e:?}");
        }
        let now = Instant::now();
        let secs = (now - last).as_secs_f64();
        match self.phases.iter_mut().find(|p| p.0 == name) {
            Some(p) => p.1 += secs,
            None => self.phases.push((name, secs)),
        }
        self.last = Some(now);
    }

    /// Logs the step's phases (milliseconds) at info level.
    pub fn report(&self, step: usize) {
        if self.last.is_none() {
            return;
        }
        let line: Vec<String> = self.phases.iter().map(|(n, s)| format!("{n} {:.1}", s * 1e3)).collect();
        let total: f64 = self.phases.iter().map(|p| p.1).sum();
        tracing::info!(step, "step phases (ms): {} | total {:.1}", line.join(", "), total * 1e3);
    }
}

/// With `BURN_MOE_SYNC_CHECK=1`: syncs the device and turns an error it reports into
/// [`TrainError::Device`](crate::train::TrainError::Device) naming `after()`, the work just queued.
/// Why: a kernel that fails to launch on CUDA is reported by CubeCL only at the next sync — in
/// training usually a collective far from the cause — so a failure names the wrong place; with the
/// check on, each unit of the per-layer schedule syncs and names itself. Off (the default):
/// nothing.
///
/// # Errors
/// The device's error, with the place.
pub fn sync_check<B: Backend>(device: &B::Device, after: impl FnOnce() -> String) -> Result<(), crate::train::TrainError> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var("BURN_MOE_SYNC_CHECK").is_ok_and(|v| v == "1")) {
        return Ok(());
    }
    B::sync(device).map_err(|e| crate::train::TrainError::Device { after: after(), detail: format!("{e:?}") })
}
