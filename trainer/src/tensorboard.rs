//! `--report-to tensorboard`: scalar summaries in TensorBoard's event-file format, written without
//! TensorFlow or a protobuf library (the three messages involved are encoded by hand).
//!
//! An event file is a sequence of TFRecords, each `u64 length (LE) · masked CRC-32C of the length ·
//! payload · masked CRC-32C of the payload`, whose payloads are `tensorflow.Event` messages: the
//! first carries `file_version = "brain.Event:2"`, then one per logged step with a `Summary` of
//! `simple_value` scalars. Files are named `events.out.tfevents.<unix seconds>.<host>`, the name
//! TensorBoard scans for; a resumed run starts a new file in the same directory, which TensorBoard
//! reads as one run.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::metrics::{MetricsError, StepMetrics};

/// The directory under the output directory that holds the event files (HF Trainer's default
/// `logging_dir` is also `OUTPUT_DIR/runs/...`).
pub const TENSORBOARD_DIR: &str = "runs";

/// Appends scalar events to one event file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, starting with the file-version event.
    ///
    /// # Errors
    /// [`MetricsError::CreateDir`] or [`MetricsError::Write`] naming the path.
    pub fn create(dir: &Path) -> Result<Self, MetricsError> {
        std::fs::create_dir_all(dir).map_err(|source| MetricsError::CreateDir { path: dir.to_path_buf(), source })?;
        let now = wall_time();
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty() && !h.contains('/')).unwrap_or_else(|| "localhost".into());
        // Seconds in the name as TensorFlow writes them; a suffix keeps two writers started in the
        // same second (tests, a quick restart) from sharing a file.
        let mut path = dir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!("events.out.tfevents.{}.{host}.{n}", now as u64));
            n += 1;
        }
        let file = File::create(&path).map_err(|source| MetricsError::Write { path: path.clone(), source })?;
        let mut writer = Self { path, file };
        writer.write_event(&encode_event(now, None, Some("brain.Event:2"), &[]))?;
        Ok(writer)
    }

    /// The event file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the step's numbers as scalars: `train/loss`, `train/learning_rate` and `train/<key>`
    /// for every extra field (`eval_loss` as `eval/loss`, as HF Trainer names them). List fields
    /// (per-layer expert load) are not scalars and stay in `metrics.jsonl` only.
    ///
    /// # Errors
    /// [`MetricsError::Write`] naming the file.
    pub fn log_step(&mut self, metrics: &StepMetrics) -> Result<(), MetricsError> {
        let mut scalars = vec![("train/loss".to_owned(), metrics.loss), ("train/learning_rate".to_owned(), metrics.learning_rate)];
        for (key, value) in &metrics.extra {
            let tag = match key.strip_prefix("eval_") {
                Some(rest) => format!("eval/{rest}"),
                None => format!("train/{key}"),
            };
            scalars.push((tag, *value));
        }
        let scalars: Vec<(&str, f32)> = scalars.iter().map(|(t, v)| (t.as_str(), *v as f32)).collect();
        self.write_event(&encode_event(wall_time(), Some(metrics.step as i64), None, &scalars))
    }

    fn write_event(&mut self, payload: &[u8]) -> Result<(), MetricsError> {
        let record = frame_record(payload);
        // Flushed per step so a crash loses at most the step being written, and TensorBoard can
        // follow the file while training runs.
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .map_err(|source| MetricsError::Write { path: self.path.clone(), source })
    }
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of TFRecords.
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    !bytes.iter().fold(!0u32, |c, &b| TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8))
}

/// The masked CRC TFRecords store (a rotation plus a constant, so that a CRC of data containing
/// CRCs is not degenerate).
#[must_use]
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// One TFRecord around `payload`.
#[must_use]
pub fn frame_record(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    out
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field << 3 | 2), out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A `tensorflow.Event`: `wall_time` (field 1, double), `step` (2, int64), `file_version` (3,
/// string) and `summary` (5: `Summary { repeated Value value = 1 }`, each `Value { tag = 1,
/// simple_value = 2 (float) }`).
#[must_use]
pub fn encode_event(wall_time: f64, step: Option<i64>, file_version: Option<&str>, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(1 << 3 | 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    if let Some(step) = step {
        out.push(2 << 3);
        varint(step as u64, &mut out);
    }
    if let Some(version) = file_version {
        bytes_field(3, version.as_bytes(), &mut out);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut v);
            v.push(2 << 3 | 5);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(1, &v, &mut summary);
        }
        bytes_field(5, &summary, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // The check value of CRC-32C (RFC 3720, appendix B.4 and the CRC catalogue) and the iSCSI
        // test vectors of 32 zero bytes and 32 0xFF bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn events_encode_as_protobuf() {
        // Hand-assembled from the Event/Summary field numbers: 0x09 wall_time (double), 0x10 step,
        // 0x2a summary { 0x0a value { 0x0a tag, 0x15 simple_value (float) } }.
        let got = encode_event(1.5, Some(300), None, &[("a", 2.0)]);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xAC, 0x02]);
        want.extend_from_slice(&[0x2A, 0x0A, 0x0A, 0x08, 0x0A, 0x01, b'a', 0x15]);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(got, want);
        let version = encode_event(0.0, None, Some("brain.Event:2"), &[]);
        assert_eq!(&version[9..11], &[0x1A, 13]);
        assert_eq!(&version[11..], b"brain.Event:2");
    }

    #[test]
    fn records_carry_length_and_checksums() {
        let record = frame_record(b"abc");
        assert_eq!(record.len(), 8 + 4 + 3 + 4);
        assert_eq!(&record[..8], &3u64.to_le_bytes());
        assert_eq!(u32::from_le_bytes(record[8..12].try_into().unwrap()), crc32c(&3u64.to_le_bytes()).rotate_right(15).wrapping_add(0xA282_EAD8));
        assert_eq!(&record[12..15], b"abc");
        assert_eq!(u32::from_le_bytes(record[15..].try_into().unwrap()), masked_crc32c(b"abc"));
    }
}
