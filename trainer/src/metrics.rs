//! Training metrics files, in the spirit of HF Trainer's `trainer_state.json` log history and
//! `train_results.json`:
//! - `OUTPUT_DIR/metrics.jsonl`: one JSON object per logged step;
//! - `OUTPUT_DIR/train_summary.json`: one object for the whole run.
//!
//! Both files are replaced atomically (temporary file in the same directory, then rename), so a
//! reader polling them during training, or a crash, never sees a half-written file.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

/// File name of the per-step log inside the output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File name of the run summary inside the output directory.
pub const SUMMARY_FILE: &str = "train_summary.json";

/// Errors writing metrics files.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The output directory could not be created.
    #[error("cannot create output directory {}: {source}", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A metrics file could not be written or renamed into place.
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Serialisation failed (not expected for these plain types).
    #[error("cannot serialise metrics: {0}")]
    Serialize(#[from] serde_json::Error),
    /// An extra field would overwrite `step`, `loss` or `learning_rate`.
    #[error("extra metric `{0}` clashes with a built-in field")]
    ReservedField(String),
}

/// One logged optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    /// Optimizer step, 1-based (the step that just finished).
    pub step: u64,
    /// Training loss of that step (mean over the logged interval if the caller averages).
    pub loss: f64,
    /// Learning rate used for that step.
    pub learning_rate: f64,
    /// Additional numeric fields, e.g. `grad_norm`, `tokens_per_second`, `aux_loss`.
    /// Written in key order after the built-in fields.
    pub extra: BTreeMap<String, f64>,
    /// Additional list fields, e.g. per-layer expert load.
    pub lists: BTreeMap<String, Vec<f64>>,
}

impl StepMetrics {
    /// A record with no extra fields.
    #[must_use]
    pub fn new(step: u64, loss: f64, learning_rate: f64) -> Self {
        Self {
            step,
            loss,
            learning_rate,
            extra: BTreeMap::new(),
            lists: BTreeMap::new(),
        }
    }

    /// Adds an extra numeric field (builder style).
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: f64) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    /// Adds a list field (builder style).
    #[must_use]
    pub fn with_list(mut self, key: impl Into<String>, values: Vec<f64>) -> Self {
        self.lists.insert(key.into(), values);
        self
    }

    /// The JSON object written as one line of `metrics.jsonl`. Non-finite numbers become
    /// `null` (JSON has no NaN), so a diverged run still produces a parseable file.
    ///
    /// # Errors
    /// [`MetricsError::ReservedField`] if an extra key is `step`, `loss` or `learning_rate`.
    pub fn to_json(&self) -> Result<Value, MetricsError> {
        let mut map = Map::new();
        map.insert("step".into(), Value::from(self.step));
        map.insert("loss".into(), json_f64(self.loss));
        map.insert("learning_rate".into(), json_f64(self.learning_rate));
        for (k, &v) in &self.extra {
            if map.contains_key(k) {
                return Err(MetricsError::ReservedField(k.clone()));
            }
            map.insert(k.clone(), json_f64(v));
        }
        for (k, v) in &self.lists {
            if map.contains_key(k) {
                return Err(MetricsError::ReservedField(k.clone()));
            }
            map.insert(k.clone(), Value::Array(v.iter().map(|&x| json_f64(x)).collect()));
        }
        Ok(Value::Object(map))
    }
}

fn json_f64(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// Summary of a finished run, written to `train_summary.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainSummary {
    /// Wall-clock training time in seconds.
    pub train_runtime: f64,
    /// Mean of the logged losses (NaN, written as null, if none were logged).
    pub train_loss: f64,
    /// Processed tokens (as counted by the caller) per second of `train_runtime`.
    pub tokens_per_second: f64,
    /// Optimizer steps taken.
    pub train_steps: u64,
    /// Peak GPU memory held by the allocator (reserved, pools included), MiB, largest over the
    /// ranks, sampled after every forward pass and optimizer step; `null` on CPU backends.
    pub gpu_mem_used_peak: Option<f64>,
    /// Peak GPU memory of live tensors (allocated), MiB, sampled like `gpu_mem_used_peak`;
    /// `null` on CPU backends.
    pub gpu_mem_alloc: Option<f64>,
    /// Loss of the last evaluation (mean over the evaluation set's target tokens); `null` when
    /// no evaluation ran.
    #[serde(default)]
    pub eval_loss: Option<f64>,
}

/// Writes `metrics.jsonl` and `train_summary.json` into an output directory.
///
/// The whole log is kept in memory and the file rewritten atomically on every
/// [`MetricsWriter::log_step`]: for the few thousand lines of a run this is cheap, and the file
/// on disk is always complete.
#[derive(Debug)]
pub struct MetricsWriter {
    dir: PathBuf,
    lines: String,
    loss_sum: f64,
    n_logged: usize,
    tensorboard: Option<crate::tensorboard::EventWriter>,
}

impl MetricsWriter {
    /// Creates `dir` (and parents) if needed and starts an empty `metrics.jsonl`, replacing
    /// one left by an earlier run in the same directory.
    ///
    /// # Errors
    /// [`MetricsError::CreateDir`] or [`MetricsError::Write`].
    pub fn create(dir: impl Into<PathBuf>) -> Result<Self, MetricsError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| MetricsError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let writer = Self {
            dir,
            lines: String::new(),
            loss_sum: 0.0,
            n_logged: 0,
            tensorboard: None,
        };
        write_atomic(&writer.metrics_path(), b"")?;
        Ok(writer)
    }

    /// Also writes every logged step as TensorBoard scalars, into a new event file in `dir`
    /// (`--report-to tensorboard`).
    ///
    /// # Errors
    /// [`MetricsError::CreateDir`] or [`MetricsError::Write`] naming the path.
    pub fn with_tensorboard(mut self, dir: &Path) -> Result<Self, MetricsError> {
        self.tensorboard = Some(crate::tensorboard::EventWriter::create(dir)?);
        Ok(self)
    }

    /// The TensorBoard event file, when [`with_tensorboard`](Self::with_tensorboard) was called.
    #[must_use]
    pub fn tensorboard_path(&self) -> Option<&Path> {
        self.tensorboard.as_ref().map(crate::tensorboard::EventWriter::path)
    }

    /// The output directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `metrics.jsonl`.
    #[must_use]
    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join(METRICS_FILE)
    }

    /// Path of `train_summary.json`.
    #[must_use]
    pub fn summary_path(&self) -> PathBuf {
        self.dir.join(SUMMARY_FILE)
    }

    /// Like [`MetricsWriter::create`], but `metrics.jsonl` starts with the lines of `history` (the
    /// log of the run being resumed), and the mean loss counts their `loss` fields.
    ///
    /// # Errors
    /// [`MetricsError::CreateDir`], [`MetricsError::Serialize`] or [`MetricsError::Write`].
    pub fn resume(dir: impl Into<PathBuf>, history: &[Value]) -> Result<Self, MetricsError> {
        let mut writer = Self::create(dir)?;
        for v in history {
            writer.lines.push_str(&serde_json::to_string(v)?);
            writer.lines.push('\n');
            writer.loss_sum += v["loss"].as_f64().unwrap_or(f64::NAN);
            writer.n_logged += 1;
        }
        write_atomic(&writer.metrics_path(), writer.lines.as_bytes())?;
        Ok(writer)
    }

    /// The logged lines so far, parsed (HF's `log_history`).
    #[must_use]
    pub fn history(&self) -> Vec<Value> {
        self.lines.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Appends one step to `metrics.jsonl`.
    ///
    /// # Errors
    /// [`MetricsError::ReservedField`] (nothing is written then) or [`MetricsError::Write`].
    pub fn log_step(&mut self, metrics: &StepMetrics) -> Result<(), MetricsError> {
        let line = serde_json::to_string(&metrics.to_json()?)?;
        self.lines.push_str(&line);
        self.lines.push('\n');
        self.loss_sum += metrics.loss;
        self.n_logged += 1;
        write_atomic(&self.metrics_path(), self.lines.as_bytes())?;
        match &mut self.tensorboard {
            Some(events) => events.log_step(metrics),
            None => Ok(()),
        }
    }

    /// Number of steps logged so far.
    #[must_use]
    pub fn n_logged(&self) -> usize {
        self.n_logged
    }

    /// Mean of the logged losses; NaN if none were logged.
    #[must_use]
    pub fn mean_logged_loss(&self) -> f64 {
        if self.n_logged == 0 {
            f64::NAN
        } else {
            self.loss_sum / self.n_logged as f64
        }
    }

    /// Builds a summary from the logged losses. GPU memory fields are `None`; a GPU backend
    /// sets them on the returned value before [`MetricsWriter::write_summary`].
    #[must_use]
    pub fn summary(&self, runtime: Duration, n_tokens: u64, train_steps: u64) -> TrainSummary {
        let secs = runtime.as_secs_f64();
        TrainSummary {
            train_runtime: secs,
            train_loss: self.mean_logged_loss(),
            tokens_per_second: if secs > 0.0 {
                n_tokens as f64 / secs
            } else {
                0.0
            },
            train_steps,
            gpu_mem_used_peak: None,
            gpu_mem_alloc: None,
            eval_loss: None,
        }
    }

    /// Writes `train_summary.json` (pretty-printed).
    ///
    /// # Errors
    /// [`MetricsError::Serialize`] or [`MetricsError::Write`].
    pub fn write_summary(&self, summary: &TrainSummary) -> Result<(), MetricsError> {
        let mut text = serde_json::to_string_pretty(summary)?;
        text.push('\n');
        write_atomic(&self.summary_path(), text.as_bytes())
    }
}

/// Replaces `path` with `contents` atomically: the data goes to a temporary file in the same
/// directory (a rename is only atomic within one file system), is synced, then renamed over
/// `path`.
///
/// # Errors
/// [`MetricsError::Write`] naming `path`.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), MetricsError> {
    let err = |source| MetricsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "metrics".into(), |n| n.to_string_lossy().into_owned());
    // The pid keeps two trainers sharing an output directory from clobbering each other's
    // temporary file; the leading dot hides it from casual listings.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: do not leave the temporary file behind; the original error matters more.
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_metrics_and_summary() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/out");
        let mut w = MetricsWriter::create(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(w.metrics_path()).unwrap(), "");

        w.log_step(&StepMetrics::new(1, 4.0, 1e-3).with("grad_norm", 2.5))
            .unwrap();
        w.log_step(&StepMetrics::new(2, 2.0, 5e-4)).unwrap();
        assert_eq!(w.n_logged(), 2);
        assert_eq!(w.mean_logged_loss(), 3.0);

        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            serde_json::json!({"step": 1, "loss": 4.0, "learning_rate": 1e-3, "grad_norm": 2.5})
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"step": 2, "loss": 2.0, "learning_rate": 5e-4})
        );

        let s = w.summary(Duration::from_secs(2), 1000, 2);
        assert_eq!(s.train_runtime, 2.0);
        assert_eq!(s.train_loss, 3.0);
        assert_eq!(s.tokens_per_second, 500.0);
        assert_eq!(s.train_steps, 2);
        w.write_summary(&s).unwrap();
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("train_summary.json")).unwrap())
                .unwrap();
        assert_eq!(v["gpu_mem_used_peak"], Value::Null);
        assert_eq!(v["gpu_mem_alloc"], Value::Null);
        assert_eq!(v["train_steps"], 2);
        let back: TrainSummary = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);

        // No temporary files left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(names, vec!["metrics.jsonl", "train_summary.json"]);
    }

    #[test]
    fn gpu_fields_serialise_when_set() {
        let s = TrainSummary {
            train_runtime: 1.0,
            train_loss: 1.0,
            tokens_per_second: 1.0,
            train_steps: 1,
            gpu_mem_used_peak: Some(1024.0),
            gpu_mem_alloc: None,
            eval_loss: Some(2.5),
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["gpu_mem_used_peak"], 1024.0);
        assert_eq!(v["gpu_mem_alloc"], Value::Null);
        assert_eq!(v["eval_loss"], 2.5);
    }

    #[test]
    fn resume_keeps_history() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::create(tmp.path()).unwrap();
        w.log_step(&StepMetrics::new(1, 4.0, 1e-3).with("eval_loss", 3.5)).unwrap();
        w.log_step(&StepMetrics::new(2, 2.0, 5e-4)).unwrap();
        let before = std::fs::read_to_string(w.metrics_path()).unwrap();
        let history = w.history();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0]["eval_loss"], 3.5);
        let mut r = MetricsWriter::resume(tmp.path(), &history).unwrap();
        assert_eq!(std::fs::read_to_string(r.metrics_path()).unwrap(), before);
        assert_eq!(r.mean_logged_loss(), 3.0);
        r.log_step(&StepMetrics::new(3, 0.0, 0.0)).unwrap();
        assert_eq!(r.mean_logged_loss(), 2.0);
        assert_eq!(r.n_logged(), 3);
    }

    #[test]
    fn non_finite_values_become_null_and_reserved_keys_rejected() {
        let v = StepMetrics::new(3, f64::NAN, 1e-3).to_json().unwrap();
        assert_eq!(v["loss"], Value::Null);

        let tmp = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::create(tmp.path()).unwrap();
        let err = w
            .log_step(&StepMetrics::new(1, 1.0, 1.0).with("loss", 2.0))
            .unwrap_err();
        assert!(matches!(err, MetricsError::ReservedField(ref k) if k == "loss"));
        assert_eq!(w.n_logged(), 0);
        assert!(w.mean_logged_loss().is_nan());
        assert_eq!(std::fs::read_to_string(w.metrics_path()).unwrap(), "");
    }

    #[test]
    fn create_dir_error_names_path() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not_a_dir");
        std::fs::write(&file, "x").unwrap();
        let err = MetricsWriter::create(file.join("sub")).unwrap_err();
        assert!(matches!(err, MetricsError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("not_a_dir"));
    }

    #[test]
    fn write_atomic_replaces_existing() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f.json");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
    }
}
