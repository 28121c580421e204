//! `metrics.jsonl`: one JSON object per line — training steps, evaluations and per-epoch data skips —
//! flushed as written, so a crash loses at most the line being written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::skips::SkipCounts;
use crate::eval::EvalReport;

pub const METRICS_FILE: &str = "metrics.jsonl";

/// The loss terms and optimiser figures of one logged step. Absent terms (switched off) are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub stage: String,
    pub resolution: u32,
    #[serde(with = "crate::json_float")]
    pub lr: f64,
    #[serde(with = "crate::json_float")]
    pub total: f64,
    #[serde(default, with = "crate::json_float::option")]
    pub rec: Option<f64>,
    #[serde(default, with = "crate::json_float::option")]
    pub pixel_l1: Option<f64>,
    #[serde(default, with = "crate::json_float::option")]
    pub latent_l1: Option<f64>,
    #[serde(default, with = "crate::json_float::option")]
    pub lpips: Option<f64>,
    #[serde(default, with = "crate::json_float::option")]
    pub und: Option<f64>,
    #[serde(default, with = "crate::json_float::option")]
    pub caption: Option<f64>,
    #[serde(default, with = "crate::json_float::option")]
    pub contrastive: Option<f64>,
    #[serde(with = "crate::json_float")]
    pub grad_norm: f64,
    /// exp(logit_scale), the contrastive inverse temperature, as the step's loss used it (before its update;
    /// clamped at 100 as `losses::contrastive_loss` clamps it).
    #[serde(with = "crate::json_float")]
    pub logit_scale: f64,
    #[serde(with = "crate::json_float")]
    pub images_per_s: f64,
    /// The f16 loss scale the step's gradients were computed at (`step::LossScale`); absent in f32/bf16.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::json_float::option")]
    pub loss_scale: Option<f64>,
}

impl StepRecord {
    /// (name, value) of every loss term present, the total first: what NaN detection and plots walk over.
    pub fn terms(&self) -> Vec<(&'static str, f64)> {
        let optional = [
            ("rec", self.rec),
            ("pixel_l1", self.pixel_l1),
            ("latent_l1", self.latent_l1),
            ("lpips", self.lpips),
            ("und", self.und),
            ("caption", self.caption),
            ("contrastive", self.contrastive),
        ];
        std::iter::once(("total", self.total))
            .chain(optional.into_iter().filter_map(|(n, v)| v.map(|v| (n, v))))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    Step(StepRecord),
    Eval {
        step: u64,
        report: EvalReport,
    },
    /// Items the data pipeline skipped during one epoch, by reason.
    Skips {
        step: u64,
        epoch: u64,
        counts: SkipCounts,
    },
    /// A resume that changed settings (`stages[0].lr: 0.001 -> 0.0005`), at the step it continued from.
    Resume {
        step: u64,
        changes: Vec<String>,
    },
}

impl Record {
    pub fn step(&self) -> u64 {
        match self {
            Record::Step(r) => r.step,
            Record::Eval { step, .. } | Record::Skips { step, .. } | Record::Resume { step, .. } => *step,
        }
    }
}

pub struct MetricsLog {
    path: PathBuf,
    /// `None` for a rank other than 0 of a data-parallel run: it logs nothing.
    file: Option<File>,
}

impl MetricsLog {
    /// Opens the run's log for appending. When resuming from `resumed_at`, records of later steps (written
    /// after that checkpoint, before a crash) are dropped first so the log matches the restored state; a
    /// torn last line (a crash mid-write) goes too, and any other line this version cannot read is kept
    /// as it is. A new record never continues a torn line.
    pub fn open(run: &Path, resumed_at: Option<u64>) -> std::io::Result<Self> {
        let path = run.join(METRICS_FILE);
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => return Err(e),
        };
        if let Some(step) = resumed_at {
            let complete = if text.ends_with(b"\n") {
                &text[..]
            } else {
                &text[..text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)]
            };
            let mut kept = String::new();
            for line in String::from_utf8_lossy(complete).lines() {
                match serde_json::from_str::<Record>(line) {
                    Ok(r) if r.step() > step => continue,
                    _ if line.trim().is_empty() => continue,
                    _ => {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                }
            }
            crate::fsio::atomic_write(&path, kept.as_bytes())?;
        }
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        if resumed_at.is_none() && !text.is_empty() && !text.ends_with(b"\n") {
            file.write_all(b"\n")?;
        }
        Ok(Self { path, file: Some(file) })
    }

    /// A log that writes nothing (ranks other than 0 of a data-parallel run).
    pub fn discard(run: &Path) -> Self {
        Self { path: run.join(METRICS_FILE), file: None }
    }

    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let mut line = serde_json::to_string(record).expect("records serialise");
        line.push('\n');
        file.write_all(line.as_bytes())?;
        file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Every record of a log; a torn last line (a crash mid-write) is ignored.
pub fn read(path: &Path) -> std::io::Result<Vec<Record>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut out = vec![];
    for line in BufReader::new(file).lines() {
        if let Ok(record) = serde_json::from_str::<Record>(&line?) {
            out.push(record);
        }
    }
    Ok(out)
}
