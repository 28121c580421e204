//! `mpirun -np 2 ov3 train` as a user runs it (build with `--features mpi`; needs Open MPI's `mpirun`):
//! rank 0 alone writes the run, a killed rank ends the job with the last checkpoint intact and `--resume`
//! continues it, a batch the ranks cannot share is refused, and a run continues with another process count.
//! (That the steps equal one process's is core/tests/mpi.rs.)

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TINY_RECIPE: &str = include_str!("fixtures/tiny_recipe.toml");

/// `mpirun -np N ov3 ARGS --backend cpu` (as root too, as CI runs); ARGS may name another backend.
fn mpirun(n: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &n.to_string(), "--oversubscribe", "--bind-to", "none", env!("CARGO_BIN_EXE_ov3")])
        .args(args)
        .args(if args.contains(&"--backend") { &[][..] } else { &["--backend", "cpu"][..] })
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}

fn output(mut cmd: Command) -> (bool, String, String) {
    let out: Output = cmd.output().expect("mpirun runs (apt-get install openmpi-bin)");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// A pipe read to its end on a thread, into a buffer the caller can look at while it fills.
type Drained = (std::sync::Arc<std::sync::Mutex<Vec<u8>>>, std::thread::JoinHandle<()>);

fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> Drained {
    let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = buffer.clone();
    let thread = std::thread::spawn(move || {
        let Some(mut pipe) = pipe else { return };
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut chunk) {
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buffer, thread)
}

/// What a [`drain`]ed pipe has delivered so far, as text.
fn text(drained: &Drained) -> String {
    String::from_utf8_lossy(&drained.0.lock().unwrap()).into_owned()
}

/// The steps of the `step` records in a run's metrics.jsonl, in file order.
fn logged_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

#[test]
fn two_ranks_train_a_run_that_rank_0_writes_once_and_one_process_continues_it() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let recipe = tmp.path().join("recipe.toml");
    std::fs::write(&recipe, TINY_RECIPE).unwrap();
    let run = tmp.path().join("run");
    let (run_s, recipe_s) = (run.to_str().unwrap(), recipe.to_str().unwrap());
    let (ok, stdout, stderr) = output(mpirun(2, &["train", "--config", recipe_s, "--out", run_s]));
    assert!(ok, "mpirun -np 2 ov3 train failed: {stderr}");
    assert!(stdout.contains("finished 6 steps") && stdout.contains("recall@1"), "{stdout}");
    assert_eq!(stdout.matches("finished 6 steps").count(), 1, "only rank 0 reports: {stdout}");
    assert!(stderr.contains("data parallel: 2 processes"), "{stderr}");
    // Every step logged exactly once, by rank 0.
    assert_eq!(logged_steps(&run), (1..=6).collect::<Vec<_>>());
    assert!(run.join("eval.json").is_file() && run.join("grids/latest.png").is_file());
    let state = std::fs::read_to_string(run.join("checkpoints/step-00000006/state.json")).unwrap();
    assert!(state.contains("\"ranks\": 2"), "{state}");

    // One process continues the two-process run and says what differs.
    let out = Command::new(env!("CARGO_BIN_EXE_ov3"))
        .args(["train", "--out", run_s, "--resume", "--backend", "cpu"])
        .output()
        .expect("ov3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("written by 2 process(es), continuing with 1"), "{stderr}");
}

#[test]
fn a_killed_rank_ends_the_job_and_resume_continues_from_the_last_checkpoint() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let recipe = tmp.path().join("recipe.toml");
    std::fs::write(&recipe, TINY_RECIPE.replace("steps = 4", "steps = 30").replace("eval_every = 3", "eval_every = 0"))
        .unwrap();
    let run = tmp.path().join("run");
    let (run_s, recipe_s) = (run.to_str().unwrap(), recipe.to_str().unwrap());
    let mut job = mpirun(2, &["train", "--config", recipe_s, "--out", run_s]);
    let mut child = job.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("mpirun starts");
    // Both pipes are read while the job runs: a full pipe would block the ranks' writes and stall the job.
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let started = Instant::now();
    while logged_steps(&run).len() < 5 {
        if started.elapsed() > Duration::from_secs(180) {
            let _ = Command::new("pkill").args(["-9", "-f", &format!("ov3 train --config {recipe_s}")]).status();
            panic!("no 5 steps logged within 3 minutes; mpirun's output so far:\n{}", text(&stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // kill -9 one rank (not rank 0: the one that does not write) mid-run.
    // The ranks' command lines start with the binary (mpirun's own starts with mpirun).
    let pattern = format!("^[^ ]*ov3 train --config {recipe_s}");
    let ranks = Command::new("pgrep").args(["-f", &pattern]).output().unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&ranks.stdout).lines().map(str::to_string).collect();
    assert_eq!(pids.len(), 2, "expected two ranks, found {pids:?}");
    let victim = pids.last().unwrap();
    assert!(Command::new("kill").args(["-9", victim]).status().unwrap().success());
    let status = child.wait().expect("mpirun exits");
    let ((_, out_thread), (err_buffer, err_thread)) = (stdout, stderr);
    let _ = (out_thread.join(), err_thread.join());
    let stderr = String::from_utf8_lossy(&err_buffer.lock().unwrap()).into_owned();
    assert!(!status.success(), "the job must fail when a rank dies");
    assert!(stderr.contains("signal 9") || stderr.contains("Killed"), "no message naming the dead rank: {stderr}");
    assert!(logged_steps(&run).len() < 32, "the job ran on after a rank died");

    // The last checkpoint is intact and a resumed job finishes the run.
    let (ok, stdout, stderr) = output(mpirun(2, &["train", "--out", run_s, "--resume"]));
    assert!(ok, "resume failed: {stderr}");
    assert!(stdout.contains("finished 32 steps"), "{stdout}");
    assert!(!stderr.contains("corrupt"), "{stderr}");
}

#[test]
fn a_global_batch_the_ranks_cannot_share_is_refused() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let recipe = tmp.path().join("recipe.toml");
    std::fs::write(&recipe, TINY_RECIPE).unwrap(); // batch 4
    let run = tmp.path().join("run");
    let (ok, _, stderr) =
        output(mpirun(3, &["train", "--config", recipe.to_str().unwrap(), "--out", run.to_str().unwrap()]));
    assert!(!ok);
    assert!(stderr.contains("batch 4 is the global batch and must divide among 3 processes"), "{stderr}");
    let (ok, _, stderr) = output(mpirun(3, &["bench", "step", "--batch", "4", "--res", "32", "--steps", "1"]));
    assert!(!ok);
    assert!(stderr.contains("must divide among 3 processes"), "{stderr}");
}

#[test]
fn auto_puts_every_rank_on_the_cpu_when_the_machine_has_no_gpu() {
    // Only a software rasterizer (lavapipe, CI) or no adapter: `auto` means flex for every rank, as for one
    // process. With one hardware GPU, rank 1 has none of its own and is refused with a reason.
    let (ok, stdout, stderr) =
        output(mpirun(2, &["bench", "step", "--backend", "auto", "--batch", "4", "--res", "32", "--steps", "1"]));
    if stderr.contains("has no GPU of its own") {
        return;
    }
    assert!(ok, "mpirun -np 2 ov3 bench step --backend auto failed: {stderr}");
    assert!(stdout.contains("\"ranks\":2") || stdout.contains("\"ranks\": 2"), "{stdout}");
}
