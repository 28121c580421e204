//! `ov3 bench step --kernels`: which GPU kernels one training step launches, and what each costs on the
//! device. The number that explains a step's fixed cost on a GPU (docs/PERFORMANCE.md "On a GPU"): every
//! launch is a dispatch the host records and the driver schedules, whatever work it carries.
//!
//! Counting goes through cubecl's launch observer (called on the issuing thread before each submit), so it
//! sees every kernel burn, burn's fusion and our WGSL attention issue, and nothing on the CPU backend (flex
//! launches no kernels). Timing asks cubecl to time each launch and wait for it: kernels then run one at a
//! time, so their sum is the step's device time without overlap, and the step's wall time minus that sum is
//! what the host and the dispatches cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cubecl::config::{TypeNameFormatLevel, type_name_format};
use cubecl::logging::{Duration, LaunchObservation, LaunchObserver, TimingMethod, TimingRequest};

/// Launches and device time per kernel name, over one observed pass.
#[derive(Default)]
struct Tally {
    timing: bool,
    /// `OV3_KERNEL_TRACE=<part of a kernel name>`: where in ov3's code those launches come from (the callers
    /// of burn in each launch's backtrace; eager builds only: burn's fusion launches at a flush).
    trace: Option<String>,
    sites: Mutex<HashMap<String, usize>>,
    per_kernel: Mutex<HashMap<&'static str, KernelCost>>,
    /// How the timings were taken: on the device (timestamp queries) or host wall around a blocking submit.
    methods: Mutex<Vec<&'static str>>,
}

#[derive(Clone, Copy, Default)]
pub struct KernelCost {
    pub launches: usize,
    pub timed: usize,
    pub ms: f64,
}

impl LaunchObserver for Tally {
    fn launched(&self, kernel: &'static str) {
        self.per_kernel.lock().expect("tally lock").entry(kernel).or_default().launches += 1;
        if self.trace.as_ref().is_some_and(|t| kernel.contains(t.as_str())) {
            let bt = std::backtrace::Backtrace::force_capture().to_string();
            let site = call_site(&bt);
            *self.sites.lock().expect("tally lock").entry(site).or_default() += 1;
        }
    }

    fn timing(&self) -> TimingRequest {
        if self.timing { TimingRequest::Resolved } else { TimingRequest::None }
    }

    fn timed(&self, kernel: &'static str, duration: Duration, method: TimingMethod) {
        let mut map = self.per_kernel.lock().expect("tally lock");
        let cost = map.entry(kernel).or_default();
        cost.timed += 1;
        cost.ms += duration.as_secs_f64() * 1e3;
        let name = match method {
            TimingMethod::Device => "device",
            TimingMethod::System => "system",
        };
        let mut methods = self.methods.lock().expect("tally lock");
        if !methods.contains(&name) {
            methods.push(name);
        }
    }
}

/// The three functions of a formatted backtrace that called into burn or cubecl, innermost first (generic
/// and inlined frames print without their module path).
fn call_site(backtrace: &str) -> String {
    let frames: Vec<&str> = backtrace
        .lines()
        .filter_map(|l| l.trim().split_once(": ").filter(|(n, _)| n.parse::<u32>().is_ok()).map(|(_, f)| f))
        .collect();
    let ours = frames.iter().rposition(|f| f.contains("burn_") || f.contains("cubecl")).map_or(0, |i| i + 1);
    let site: Vec<&str> =
        frames[ours.min(frames.len())..].iter().take(3).map(|f| f.split('<').next().unwrap_or(f)).collect();
    if site.is_empty() { "(unknown)".into() } else { site.join(" < ") }
}

/// What one observed pass launched.
pub struct Launches {
    /// (kernel name shortened the way cubecl's profiling log does, cost), most expensive first (by time when
    /// timed, else by launches).
    pub kernels: Vec<(String, KernelCost)>,
    /// "device", "system" or both ("device+system"): how the timings were taken; None when not timed.
    pub timing: Option<String>,
    /// `OV3_KERNEL_TRACE`'s launches by call site, most first.
    pub sites: Vec<(String, usize)>,
}

impl Launches {
    pub fn total(&self) -> usize {
        self.kernels.iter().map(|(_, c)| c.launches).sum()
    }

    /// Sum of the timed launches' device time (ms), when timed.
    pub fn device_ms(&self) -> Option<f64> {
        self.timing.as_ref().map(|_| self.kernels.iter().map(|(_, c)| c.ms).sum())
    }

    /// The JSON line `ov3 bench step --kernels` prints beside the step's: totals and the `top` kernels.
    pub fn json(&self, top: usize, context: &serde_json::Value, step_ms: f64) -> serde_json::Value {
        let rows: Vec<_> = self
            .kernels
            .iter()
            .take(top)
            .map(|(name, c)| {
                serde_json::json!({"kernel": name, "launches": c.launches, "ms": self.timing.as_ref().map(|_| c.ms)})
            })
            .collect();
        let mut out = serde_json::json!({
            "bench": "kernels",
            "launches_per_step": self.total(),
            "distinct_kernels": self.kernels.len(),
            "timing": self.timing,
            "device_ms_per_step": self.device_ms(),
            "step_ms": step_ms,
            "top": rows,
        });
        if !self.sites.is_empty() {
            out["traced"] =
                self.sites.iter().map(|(site, n)| serde_json::json!({"site": site, "launches": n})).collect();
        }
        if let (Some(obj), Some(ctx)) = (out.as_object_mut(), context.as_object()) {
            for (k, v) in ctx {
                obj.entry(k.clone()).or_insert(v.clone());
            }
        }
        out
    }
}

/// A kernel's name as cubecl's profiling log shortens it ("KernelBinop | MulOp"); a long one (matmul's
/// two dozen type parameters) keeps its first part and its `...Family` parts (the algorithm).
fn short_name(kernel: &str) -> String {
    let name = type_name_format(kernel, TypeNameFormatLevel::Balanced);
    let parts: Vec<&str> = name.split(" | ").collect();
    if parts.len() <= 4 {
        return name;
    }
    let mut kept = vec![parts[0]];
    kept.extend(parts.iter().skip(1).filter(|p| p.ends_with("Family")));
    kept.join(" | ")
}

/// Run `pass` with every kernel launch counted (and, with `timing`, each timed and waited for).
pub fn observe<T>(timing: bool, pass: impl FnOnce() -> T) -> (T, Launches) {
    let trace = std::env::var("OV3_KERNEL_TRACE").ok().filter(|t| !t.is_empty());
    let tally = Arc::new(Tally { timing, trace, ..Tally::default() });
    let watching = LaunchObservation::new(tally.clone());
    let out = pass();
    drop(watching);
    let map = std::mem::take(&mut *tally.per_kernel.lock().expect("tally lock"));
    // Several kernel types can shorten to one name (the same op at two element types): merged.
    let mut merged: HashMap<String, KernelCost> = HashMap::new();
    for (name, cost) in map {
        let entry = merged.entry(short_name(name)).or_default();
        entry.launches += cost.launches;
        entry.timed += cost.timed;
        entry.ms += cost.ms;
    }
    let mut kernels: Vec<_> = merged.into_iter().collect();
    kernels.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms).then(b.1.launches.cmp(&a.1.launches)).then(a.0.cmp(&b.0)));
    let methods = tally.methods.lock().expect("tally lock");
    let timing = (timing && !methods.is_empty()).then(|| methods.join("+"));
    let mut sites: Vec<_> = std::mem::take(&mut *tally.sites.lock().expect("tally lock")).into_iter().collect();
    sites.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    (out, Launches { kernels, timing, sites })
}

#[cfg(test)]
mod tests {
    /// The frames after the last burn/cubecl one, generic arguments dropped (a backtrace as std formats it,
    /// trimmed to what matters; "at" lines interleaved).
    #[test]
    fn call_site_names_the_callers_of_burn() {
        let backtrace = "   0: launched\n             at native/src/bench_kernels.rs:40:5\n\
                         \x20  1: cubecl_runtime::client::Client::launch\n\
                         \x20  2: burn_cubecl::ops::numeric::zeros_client\n\
                         \x20  3: sum<1, burn_tensor::bridge::kind::Float>\n\
                         \x20            at burn-tensor/src/bridge.rs:9:1\n\
                         \x20  4: cross_entropy\n   5: caption_loss\n   6: understanding_terms\n   7: losses\n";
        assert_eq!(super::call_site(backtrace), "cross_entropy < caption_loss < understanding_terms");
        assert_eq!(super::call_site("   0: launched\n   1: burn_cubecl::x\n"), "(unknown)");
    }
}
