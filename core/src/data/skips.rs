//! Why an item was skipped, and how many times: bad input never stops or corrupts a run, it is counted.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    /// The image file or member cannot be read.
    Unreadable,
    /// Zero bytes, truncated, corrupt, or not an image at all.
    CorruptImage,
    /// More pixels than the configured limit (decompression bombs), refused before decoding.
    TooLarge,
    /// Smaller than the minimum side.
    TooSmall,
    MissingImage,
    MissingCaption,
    EmptyCaption,
    NonUtf8Caption,
    /// A `.json` caption member without a caption field, or not JSON.
    BadCaption,
    /// A table row without an image path.
    BadRow,
    MissingShard,
    TruncatedShard,
    /// The image decoder panicked on this item (a bug in a codec, caught so that the run goes on; the
    /// panic message is on stderr).
    DecoderPanic,
}

impl Skip {
    pub fn name(self) -> &'static str {
        match self {
            Skip::Unreadable => "unreadable",
            Skip::CorruptImage => "corrupt image",
            Skip::TooLarge => "too many pixels",
            Skip::TooSmall => "too small",
            Skip::MissingImage => "missing image",
            Skip::MissingCaption => "missing caption",
            Skip::EmptyCaption => "empty caption",
            Skip::NonUtf8Caption => "non-UTF-8 caption",
            Skip::BadCaption => "bad caption JSON",
            Skip::BadRow => "bad table row",
            Skip::MissingShard => "missing shard",
            Skip::TruncatedShard => "truncated shard",
            Skip::DecoderPanic => "decoder panic",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SkipCounts(pub BTreeMap<Skip, u64>);

impl SkipCounts {
    pub fn add(&mut self, skip: Skip) {
        *self.0.entry(skip).or_default() += 1;
    }

    pub fn merge(&mut self, other: &SkipCounts) {
        for (k, v) in &other.0 {
            *self.0.entry(*k).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn get(&self, skip: Skip) -> u64 {
        self.0.get(&skip).copied().unwrap_or(0)
    }

    /// "3 skipped: 2 corrupt image, 1 missing caption" or "nothing skipped".
    pub fn summary(&self) -> String {
        if self.0.is_empty() {
            return "nothing skipped".into();
        }
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{v} {}", k.name())).collect();
        format!("{} skipped: {}", self.total(), parts.join(", "))
    }
}

impl fmt::Display for SkipCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}
