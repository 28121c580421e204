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
    pub lr: f64,
    pub total: f64,
    pub rec: Option<f64>,
    pub pixel_l1: Option<f64>,
    pub latent_l1: Option<f64>,
    pub lpips: Option<f64>,
    pub und: Option<f64>,
    pub caption: Option<f64>,
    pub contrastive: Option<f64>,
    pub grad_norm: f64,
    /// exp(logit_scale), the contrastive inverse temperature.
    pub logit_scale: f64,
    pub images_per_s: f64,
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
}

impl Record {
    pub fn step(&self) -> u64 {
        match self {
            Record::Step(r) => r.step,
            Record::Eval { step, .. } | Record::Skips { step, .. } => *step,
        }
    }
}

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the run's log for appending. When resuming from `resumed_at`, lines of later steps (written
    /// after that checkpoint, before a crash) are dropped first so the log matches the restored state.
    pub fn open(run: &Path, resumed_at: Option<u64>) -> std::io::Result<Self> {
        let path = run.join(METRICS_FILE);
        if let Some(step) = resumed_at {
            let kept: Vec<Record> = read(&path)?.into_iter().filter(|r| r.step() <= step).collect();
            let mut text = String::new();
            for r in &kept {
                text.push_str(&serde_json::to_string(r).expect("records serialise"));
                text.push('\n');
            }
            crate::fsio::atomic_write(&path, text.as_bytes())?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Self { path, file })
    }

    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_string(record).expect("records serialise");
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()
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
