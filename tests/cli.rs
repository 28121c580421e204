//! End-to-end: the `ov3` binary as a user runs it.

use std::process::{Command, Output};

fn ov3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ov3")).args(args).output().expect("ov3 binary runs")
}

/// Runs `ov3 ARGS --backend cpu`, asserts success, returns stdout.
fn ov3_ok(args: &[&str]) -> String {
    let out = ov3(&[args, &["--backend", "cpu"]].concat());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "ov3 {} failed: {stderr}", args.join(" "));
    stdout
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs `ov3 ARGS` (a wgpu command), asserts success and returns (stdout, stderr); `None`, said on stderr, where
/// the machine has no wgpu adapter (or not the one the command needs: no subgroups), unless `OV3_TEST_WGPU=1`
/// (CI, on lavapipe) makes a missing adapter a failure.
fn wgpu_run(args: &[&str]) -> Option<(String, String)> {
    let out = ov3(args);
    let (stdout, stderr) = text(&out);
    let ci = std::env::var("OV3_TEST_WGPU").as_deref() == Ok("1");
    if !out.status.success() && ((stderr.contains("adapter") && !ci) || stderr.contains("adapter has none")) {
        eprintln!("skipping: {stderr}");
        return None;
    }
    assert!(out.status.success(), "ov3 {} failed: {stderr}", args.join(" "));
    Some((stdout, stderr))
}

#[test]
fn info_lists_parameter_counts_per_part() {
    let out = ov3(&["info", "--preset", "tiny", "--backend", "cpu"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "ov3 info failed: {stderr}");
    for part in ["encoder", "decoder", "image_head", "text_encoder", "text_decoder", "total"] {
        assert!(stdout.contains(part), "ov3 info does not list {part}:\n{stdout}");
    }
    assert!(stdout.contains("backend: cpu (flex)"), "ov3 info does not say which backend:\n{stdout}");
}

#[test]
fn bench_step_prints_one_json_line() {
    let out =
        ov3(&["bench", "step", "--backend", "cpu", "--batch", "2", "--res", "32", "--steps", "1", "--warmup", "0"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "bench failed: {stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("bench prints JSON");
    assert!(v["ms_per_step"].as_f64().expect("ms_per_step") > 0.0);
    assert_eq!(v["batch"], 2);
    // No cubecl compiler on the CPU backend; which build ran is in the line.
    assert_eq!((&v["compiler"], &v["fusion"]), (&"flex".into(), &cfg!(feature = "fusion").into()), "{stdout}");
}

/// `--kernels count` on wgpu: a second JSON line with the step's kernel launches, our AdamW kernel (in place,
/// several of the tiny preset's 239 parameter tensors a launch) among them. Skipped without an adapter unless `OV3_TEST_WGPU=1` (CI).
#[test]
fn bench_step_counts_kernel_launches_on_wgpu() {
    let args = ["bench", "step", "--backend", "wgpu", "--batch", "2", "--res", "32", "--steps", "1", "--warmup", "1"];
    let Some((stdout, _)) = wgpu_run(&[&args[..], &["--kernels", "count"]].concat()) else { return };
    let lines: Vec<serde_json::Value> =
        stdout.lines().map(|l| serde_json::from_str(l).expect("bench prints JSON lines")).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    // The default build compiles WGSL, so our kernels ran (a `vulkan` build's SPIR-V runs burn's ops).
    if !cfg!(feature = "vulkan") {
        assert_eq!((&lines[0]["compiler"], &lines[0]["wgpu_ops"]), (&"wgpu<wgsl>".into(), &"ov3".into()), "{stdout}");
    }
    let k = &lines[1];
    assert_eq!(k["bench"], "kernels");
    let total = k["launches_per_step"].as_u64().expect("launches_per_step");
    let top = k["top"].as_array().expect("top kernels");
    let listed: u64 = top.iter().map(|t| t["launches"].as_u64().expect("launches")).sum();
    assert!(total > 1000 && listed <= total, "{total} launches, {listed} in the top rows");
    assert!(k["device_ms_per_step"].is_null(), "count does not time");
    // The training step owns its parameters and moments: AdamW writes over them (no new buffers), several
    // parameters a launch on a card (`OV3_ADAMW_GATHER=auto`), one each on a CPU adapter such as lavapipe, under
    // burn's fusion (which runs our kernels from its queue; `optim_gpu::params_per_launch`).
    let per_launch = lines[0]["adamw_per_launch"].as_u64().expect("adamw_per_launch");
    let adamw = |top: &[serde_json::Value], kernel: &str| {
        let found = top.iter().find(|t| t["kernel"].as_str().is_some_and(|n| n.ends_with(kernel)));
        found.unwrap_or_else(|| panic!("{kernel} among the most launched: {top:?}"))["launches"].as_u64().unwrap()
    };
    let (kernel, range) = match per_launch {
        1 => ("AdamwInPlaceKernel", 100..1000),
        _ => ("AdamwInPlaceGatheredKernel", 20..60),
    };
    let launched = adamw(top, kernel);
    assert!(range.contains(&launched), "{kernel} launched {launched} times, expected {range:?}");
    // The no-op adapter is dressed as this machine's first adapter, so cubecl and ov3 choose the same kernels:
    // the same launches, none of them run.
    let noop = ov3(&[&args[..], &["--kernels", "count", "--noop"]].concat());
    let (noop_out, noop_err) = text(&noop);
    assert!(noop.status.success(), "bench step --noop failed: {noop_err}");
    let noop_lines: Vec<serde_json::Value> = noop_out.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!((&noop_lines[0]["noop"], &lines[0]["noop"]), (&true.into(), &false.into()), "{noop_out}");
    assert_eq!(noop_lines[1]["launches_per_step"], k["launches_per_step"], "{noop_out}\n{stdout}");
    // `OV3_ADAMW_GATHER=on` gathers wherever the bindings allow (lavapipe: 7 a launch): the same step but AdamW's
    // launches, each of the one-a-parameter launches replaced (the tiny model's 239 tensors in 20 to 60).
    let on = Command::new(env!("CARGO_BIN_EXE_ov3"))
        .args([&args[..], &["--kernels", "count", "--noop"]].concat())
        .env("OV3_ADAMW_GATHER", "on")
        .output()
        .expect("ov3 binary runs");
    let (on_out, on_err) = text(&on);
    assert!(on.status.success(), "bench step --noop with OV3_ADAMW_GATHER=on failed: {on_err}");
    let on_lines: Vec<serde_json::Value> = on_out.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    let on_per_launch = on_lines[0]["adamw_per_launch"].as_u64().expect("adamw_per_launch");
    let unfused = !cfg!(feature = "fusion");
    assert_eq!(on_per_launch > 1, unfused, "OV3_ADAMW_GATHER=on gathers without burn's fusion: {on_out}");
    if per_launch == 1 && unfused {
        let top = on_lines[1]["top"].as_array().expect("top kernels");
        let gathered = adamw(top, "AdamwInPlaceGatheredKernel");
        assert!((20..60).contains(&gathered), "{gathered} gathered launches: {on_out}");
        let total = |l: &serde_json::Value| l["launches_per_step"].as_u64().expect("launches_per_step");
        assert_eq!(total(&on_lines[1]), total(k) - launched + gathered, "only AdamW's launches change: {on_out}");
    }
}

/// `bench step --noop`: wgpu's no-op adapter, which needs no GPU or driver (dressed as the first adapter where
/// there is one, as everything wgpu can report where there is none): the step's host cost, every launch of a
/// wgpu step recorded. Bad settings of the pool variable and a CPU backend are refused.
#[test]
fn bench_step_on_the_noop_adapter_runs_anywhere() {
    let args = ["bench", "step", "--noop", "--batch", "2", "--res", "32", "--steps", "1", "--warmup", "1"];
    let out = Command::new(env!("CARGO_BIN_EXE_ov3"))
        .args([&args[..], &["--kernels", "count"]].concat())
        .env("OV3_WGPU_MEMORY", "exclusive")
        .output()
        .expect("ov3 binary runs");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "bench step --noop failed: {stderr}");
    assert!(stderr.contains("nothing runs"), "the no-op adapter is not named as such: {stderr}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!((&lines[0]["noop"], &lines[0]["memory"]), (&true.into(), &"exclusive".into()), "{stdout}");
    assert!(lines[0]["adapter"].as_str().is_some_and(|a| a.starts_with("wgpu no-op")), "{stdout}");
    let launches = lines[1]["launches_per_step"].as_u64().expect("launches_per_step");
    assert!(launches > 1000, "{launches} launches recorded for a whole training step");
    for (env, extra, says) in [
        ("adaptive", &["--backend", "cpu"][..], "not with --backend cpu"),
        ("pages", &[][..], "OV3_WGPU_MEMORY must be adaptive or exclusive, got 'pages'"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ov3"))
            .args([&args[..], extra].concat())
            .env("OV3_WGPU_MEMORY", env)
            .output()
            .expect("ov3 binary runs");
        let (_, stderr) = text(&out);
        assert!(!out.status.success() && stderr.contains(says), "{extra:?} with OV3_WGPU_MEMORY={env}: {stderr}");
    }
}

/// `OV3_FLASH_SPLIT` takes 1, 2 or 4, `OV3_ADAMW_GATHER` auto, on or off: anything else is refused with the
/// variable named, whatever the backend.
#[test]
fn bad_kernel_settings_are_refused() {
    for (var, value, says) in [
        ("OV3_FLASH_SPLIT", "3", "OV3_FLASH_SPLIT must be 1, 2 or 4"),
        ("OV3_ADAMW_GATHER", "yes", "OV3_ADAMW_GATHER must be auto, on or off"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ov3"))
            .args(["bench", "step", "--backend", "cpu", "--batch", "2", "--res", "32", "--steps", "1", "--warmup", "0"])
            .env(var, value)
            .output()
            .expect("ov3 binary runs");
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{var}={value} accepted");
        assert!(stderr.contains(says), "{stderr}");
    }
}

/// `ov3 bench attention --split 1,4` on wgpu: a fused row per split, each within 1e-4 of the unfused path (its
/// own check, over the output and the three gradients). Skipped without an adapter unless `OV3_TEST_WGPU=1`.
#[test]
fn bench_attention_checks_each_split_against_the_unfused_path() {
    let args = ["bench", "attention", "--seq", "37", "--batch", "1", "--heads", "2", "--steps", "1", "--warmup", "0"];
    // An adapter without subgroups refuses the split ("... and this adapter has none"): skipped there.
    let Some((stdout, _)) = wgpu_run(&[&args[..], &["--split", "1,4"]].concat()) else { return };
    let lines: Vec<serde_json::Value> =
        stdout.lines().map(|l| serde_json::from_str(l).expect("bench prints JSON lines")).collect();
    let splits: Vec<u64> = lines.iter().filter_map(|l| l["split"].as_u64()).filter(|&s| s > 0).collect();
    assert_eq!(splits, [1, 4], "{stdout}");
    for line in &lines {
        if line["impl"] == "unfused matmul-softmax-matmul" {
            assert!(line["error_vs_unfused"].is_null(), "{line}");
        } else {
            let err = line["error_vs_unfused"].as_f64().expect("error_vs_unfused");
            assert!(err < 1e-4, "{}: {err:.2e} from the unfused path", line["impl"]);
        }
    }
}

/// A PNG whose header claims 12000 x 12000 pixels (144 Mpx, over the 64 Mpx limit): every command that
/// reads an image refuses it from the header, before decoding, as the data loader does.
fn bomb_png(path: &std::path::Path) {
    let crc = |bytes: &[u8]| {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    };
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(12000u32.to_be_bytes());
    ihdr.extend(12000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc(&ihdr).to_be_bytes());
    // The start of the pixel data (a decoder reads the size from IHDR once it reaches IDAT).
    let idat = [b"IDAT".as_slice(), &[0x78, 0x9c, 0x01, 0x00]].concat();
    png.extend(4u32.to_be_bytes());
    png.extend(&idat);
    png.extend(crc(&idat).to_be_bytes());
    png.extend([0, 0, 0, 0]);
    png.extend(b"IEND");
    png.extend(crc(b"IEND").to_be_bytes());
    std::fs::write(path, png).expect("write");
}

#[test]
fn oversized_images_and_resolutions_are_refused_before_any_work() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    let bomb = dir.path().join("bomb.png");
    bomb_png(&bomb);
    let (bomb_s, out_s) = (bomb.to_str().unwrap(), dir.path().join("out.png"));
    let out_s = out_s.to_str().unwrap();
    let photo = fixture("astronaut64.png");
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["reconstruct", "--backend", "cpu", "--image", bomb_s, "--out", out_s], "pixels"),
        (vec!["vae", "encode", "--backend", "cpu", "--image", bomb_s, "--out", "/tmp/x.safetensors"], "pixels"),
        (
            vec![
                "reconstruct",
                "--backend",
                "cpu",
                "--image",
                photo.to_str().unwrap(),
                "--res",
                "65536",
                "--out",
                out_s,
            ],
            "4096",
        ),
        (vec!["bench", "step", "--backend", "cpu", "--res", "100000"], "4096"),
    ];
    for (args, reason) in cases {
        let out = ov3(&args);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        let line = stderr.lines().find(|l| l.starts_with("error")).unwrap_or_default();
        assert!(line.contains(reason), "{args:?}: expected `{reason}` in the error: {stderr}");
    }
}

#[test]
fn bad_input_is_one_line_and_a_nonzero_exit() {
    for args in [
        vec!["bench", "step", "--backend", "cpu", "--res", "100"],
        vec!["bench", "step", "--backend", "cpu", "--kernels", "count"],
        vec!["bench", "step", "--backend", "cpu", "--kernels", "all"],
        vec!["overfit", "--backend", "cpu", "--batch", "1"],
        vec!["info", "--preset", "huge"],
        vec!["info", "--backend", "cuda"],
    ] {
        let out = ov3(&args);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        let reason = stderr.lines().find(|l| l.starts_with("error")).unwrap_or_default();
        assert!(!reason.is_empty(), "{args:?} gave no error line: {stderr}");
    }
}

fn fixture(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vae").join(rel)
}

/// `name` from a safetensors file as f32 values.
fn tensor_values(path: &std::path::Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let w = ov3_core::weights::Weights::open(path).expect("safetensors output");
    let shape = w.shape(name).expect("tensor present");
    let values = w.values(name, &shape).expect("values");
    (shape, values)
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64)) / scale
}

#[test]
fn vae_encode_and_decode_match_the_reference_for_every_layout() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    let photo = fixture("astronaut64.png");
    let reference = fixture("reference.safetensors");
    for (set, vae) in [
        ("flux_diffusers", fixture("flux_diffusers")),
        ("flux_bfl_bf16", fixture("flux_bfl_bf16.safetensors")),
        ("taef1_diffusers", fixture("taef1_diffusers")),
        ("taef1_original", fixture("taef1_original")),
    ] {
        let latents = dir.path().join(format!("{set}.latents.safetensors"));
        let vae = vae.to_str().expect("utf-8 path");
        let (photo_s, latents_s) = (photo.to_str().expect("path"), latents.to_str().expect("path"));
        ov3_ok(&["vae", "encode", "--vae", vae, "--image", photo_s, "--out", latents_s]);
        let (shape, got) = tensor_values(&latents, "latents");
        assert_eq!(shape, vec![1, 16, 8, 8]);
        let err = max_rel_err(&got, &tensor_values(&reference, &format!("{set}.mean")).1);
        assert!(err < 1e-4, "{set}: encoded latents relative error {err:.2e}");

        let image = dir.path().join(format!("{set}.image.safetensors"));
        let png = dir.path().join(format!("{set}.png"));
        for out_path in [&image, &png] {
            ov3_ok(&["vae", "decode", "--vae", vae, "--latents", latents_s, "--out", out_path.to_str().expect("path")]);
            assert!(out_path.exists(), "{set}: decode wrote no {}", out_path.display());
        }
        let err =
            max_rel_err(&tensor_values(&image, "image").1, &tensor_values(&reference, &format!("{set}.decoded")).1);
        assert!(err < 1e-3, "{set}: decoded image relative error {err:.2e}");
    }
}

#[test]
fn vae_commands_reject_bad_input_in_one_line() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    let not_image = dir.path().join("notes.png");
    std::fs::write(&not_image, b"not an image").expect("write");
    let vae = fixture("taef1_original");
    // Latents with a zero-sized side: refused from the header, not handed to the decoder.
    let empty = dir.path().join("empty.safetensors");
    ov3_core::weights::save_f32(&empty, &[("latents", vec![1, 16, 0, 4], vec![])]).expect("write");
    let decode = |latents: &std::path::Path| -> Vec<String> {
        let (vae, latents) = (vae.to_str().expect("p"), latents.to_str().expect("p"));
        ["vae", "decode", "--backend", "cpu", "--vae", vae, "--latents", latents, "--out", "/tmp/x.png"]
            .map(String::from)
            .to_vec()
    };
    let (empty_latents, not_latents) = (decode(&empty), decode(&fixture("astronaut64.png")));
    for args in [
        empty_latents.iter().map(String::as_str).collect::<Vec<_>>(),
        not_latents.iter().map(String::as_str).collect(),
        vec![
            "vae",
            "encode",
            "--backend",
            "cpu",
            "--vae",
            vae.to_str().expect("p"),
            "--image",
            not_image.to_str().expect("p"),
            "--out",
            "/tmp/x.safetensors",
        ],
        vec![
            "vae",
            "encode",
            "--backend",
            "cpu",
            "--vae",
            "/nonexistent/ae.safetensors",
            "--image",
            fixture("astronaut64.png").to_str().expect("p"),
            "--out",
            "/tmp/x.safetensors",
        ],
    ] {
        let out = ov3(&args);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert_eq!(stderr.lines().filter(|l| l.starts_with("error")).count(), 1, "{args:?}: {stderr}");
    }
}

#[test]
fn datagen_writes_deterministic_captioned_pairs() {
    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        let out = ov3(&["datagen", "--n", "3", "--res", "48", "--seed", "9", "--out", out.to_str().expect("path")]);
        assert!(out.status.success(), "datagen: {}", text(&out).1);
        // stderr is a pipe here, not a terminal: the progress bar still says how far it got, as a plain line.
        assert!(text(&out).1.lines().any(|l| l.contains("/3 images [")), "no progress line: {}", text(&out).1);
    }
    for i in 0..3 {
        let png = std::fs::read(a.join(format!("{i:06}.png"))).expect("png written");
        assert_eq!(png, std::fs::read(b.join(format!("{i:06}.png"))).expect("png"), "image {i} differs between runs");
        let caption = std::fs::read_to_string(a.join(format!("{i:06}.txt"))).expect("caption written");
        assert!(caption.contains("background"), "caption {i}: {caption}");
        let img = image::load_from_memory(&png).expect("valid png");
        assert_eq!((img.width(), img.height()), (48, 48));
    }
}

/// `ov3 vae check` on held-out synthetic scenes with the embedded autoencoder (a fresh clone has no weights
/// on disk: no --vae means the embedded one): (autoencoder, 8x block average, mean colour) PSNR in dB.
fn embedded_check(res: &str) -> (f64, f64, f64) {
    let out = ov3(&["vae", "check", "--backend", "cpu", "--n", "16", "--res", res]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "vae check: {stderr}");
    let row = stdout.lines().find(|l| l.starts_with("held-out synthetic")).expect("synthetic row");
    let nums: Vec<f64> = row.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    // Columns: autoencoder, 8x block average, mean colour, worst margin.
    (nums[nums.len() - 4], nums[nums.len() - 3], nums[nums.len() - 2])
}

#[test]
fn embedded_autoencoder_reconstructs_structure() {
    let (ours, _, flat) = embedded_check("128");
    assert!(
        ours > flat + 3.0,
        "embedded autoencoder {ours:.2} dB is not clearly above the mean-colour baseline {flat:.2} dB"
    );
}

#[test]
fn embedded_autoencoder_beats_block_averaging() {
    let (ours, naive, _) = embedded_check("128");
    assert!(ours > naive, "embedded autoencoder {ours:.2} dB does not beat 8x block averaging {naive:.2} dB");
}

/// The shipped autoencoder on the four photographs of assets/photos, which no training set contains (issue 23
/// asks >= 2 dB over 8x block averaging on every photograph and >= 7 on average; the one embedded since
/// session 30 gives +7.04 to +8.00, +7.46 on average, deterministic on one machine): each row's margin over
/// block averaging. With `--n 0` there is no synthetic row, and the four images' mean row is the mean of theirs.
#[test]
fn embedded_autoencoder_beats_block_averaging_on_every_photograph() {
    let photos = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/photos");
    let images: Vec<String> =
        ["astronaut", "chelsea", "coffee", "rocket"].iter().map(|name| format!("{photos}/{name}.jpg")).collect();
    let mut args = vec!["vae", "check", "--backend", "cpu", "--n", "0", "--res", "128", "--images"];
    args.extend(images.iter().map(String::as_str));
    let out = ov3(&args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "vae check: {stderr}");
    assert!(!stdout.contains("synthetic"), "--n 0 printed a synthetic row: {stdout}");
    let numbers = |row: &str| -> Vec<f64> { row.split_whitespace().filter_map(|w| w.parse().ok()).collect() };
    let mut sums = [0.0; 3];
    for image in &images {
        let row = stdout.lines().find(|l| l.starts_with(image.as_str())).unwrap_or_else(|| panic!("{image}: {stdout}"));
        let nums = numbers(row);
        let (ours, naive) = (nums[nums.len() - 4], nums[nums.len() - 3]);
        assert!(ours > naive + 2.0, "{image}: embedded autoencoder {ours:.2} dB, 8x block averaging {naive:.2} dB");
        (0..3).for_each(|k| sums[k] += nums[nums.len() - 4 + k]);
    }
    let mean_row = stdout.lines().find(|l| l.starts_with("the 4 --images, mean")).unwrap_or_else(|| panic!("{stdout}"));
    let nums = numbers(mean_row);
    for k in 0..3 {
        // The rows and the mean row are each rounded to 0.01 dB: the mean of the printed rows is within 0.005 of
        // the unrounded mean, and the printed mean within 0.005 too (27.36 printed against 109.41 / 4 = 27.3525).
        assert!((nums[nums.len() - 4 + k] - sums[k] / 4.0).abs() < 0.0101, "column {k}: {mean_row} vs {sums:?} / 4");
    }
    let (ours, naive) = (nums[nums.len() - 4], nums[nums.len() - 3]);
    assert!(
        ours >= 25.0 && ours > naive + 7.0,
        "the four photographs: {ours:.2} dB against {naive:.2} for block averaging"
    );
    let nothing = ov3(&["vae", "check", "--backend", "cpu", "--n", "0"]);
    assert!(!nothing.status.success() && text(&nothing).1.contains("nothing to check"), "{:?}", text(&nothing));
}

#[test]
fn data_check_reports_counts_and_refuses_unusable_sources() {
    let out = ov3(&["data", "check", "synthetic:6:2", "--show", "2"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "data check: {stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("sample ")).count(), 2, "{stdout}");
    assert!(stdout.contains("checked: 6 items, 6 usable (nothing skipped)"), "{stdout}");

    let dir = ov3_core::fsio::ScratchDir::new().expect("temp dir");
    std::fs::write(dir.path().join("x.png"), b"not a png").expect("write");
    std::fs::write(dir.path().join("x.txt"), b"a caption").expect("write");
    for spec in [dir.path().to_str().expect("p"), "/no/such/folder", "synthetic:0"] {
        let out = ov3(&["data", "check", spec]);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{spec} should fail");
        assert_eq!(stderr.lines().filter(|l| l.starts_with("error")).count(), 1, "{spec}: {stderr}");
        assert!(!stderr.contains("panicked"), "{spec}: {stderr}");
    }
}

/// A two-stage recipe small enough for CI: 32 px then 48 px, a few steps each.
const TINY_RECIPE: &str = include_str!("fixtures/tiny_recipe.toml");

#[test]
fn train_then_use_the_run_end_to_end() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let recipe = tmp.path().join("recipe.toml");
    std::fs::write(&recipe, TINY_RECIPE).unwrap();
    let run = tmp.path().join("run");
    let (run_s, recipe_s) = (run.to_str().unwrap(), recipe.to_str().unwrap());
    let out = ov3(&["train", "--config", recipe_s, "--out", run_s, "--backend", "cpu"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "train failed: {stderr}");
    assert!(stdout.contains("finished 6 steps") && stdout.contains("recall@1"), "{stdout}");
    for file in
        ["config.toml", "metrics.jsonl", "eval.json", "plots/training.png", "plots/eval.png", "grids/latest.png"]
    {
        assert!(run.join(file).is_file(), "the run lacks {file}");
    }
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let kinds: Vec<String> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line")["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "step").count(), 6);
    assert_eq!(kinds.iter().filter(|k| *k == "eval").count(), 2); // at step 3 and at the last step, 6
    // A finished run refuses a fresh start into the same folder; --resume has nothing left to do.
    let again = ov3(&["train", "--config", recipe_s, "--out", run_s, "--backend", "cpu"]);
    assert!(!again.status.success() && text(&again).1.contains("already holds a run"));
    // --resume with a recipe named resumes into that recipe (a run of an older recipe continues into its
    // added stages); the quick recipe is another run altogether, refused with the difference named.
    let other = ov3(&["train", "--recipe", "quick", "--out", run_s, "--resume", "--backend", "cpu"]);
    let (_, stderr) = text(&other);
    assert!(!other.status.success() && stderr.contains("was started with a different config"), "{stderr}");

    let photo = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/photos/coffee.jpg");
    let rec = tmp.path().join("rec.png");
    let (rec_s, exported, json) =
        (rec.to_str().unwrap(), tmp.path().join("model.safetensors"), tmp.path().join("eval.json"));
    assert!(ov3_ok(&["reconstruct", "--run", run_s, "--image", photo, "--res", "48", "--out", rec_s]).contains("psnr"));
    assert_eq!(image::image_dimensions(&rec).unwrap(), (48, 48));
    ov3_ok(&["caption", "--run", run_s, "--image", photo, "--res", "32"]);
    ov3_ok(&["export", "--run", run_s, "--out", exported.to_str().unwrap()]);
    let exported_s = exported.to_str().unwrap();
    ov3_ok(&["eval", "--model", exported_s, "--n", "4", "--res", "32", "--json", json.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["n"], 4);
    assert!(report["psnr"].as_f64().unwrap().is_finite() && report["zero_shot_accuracy"].as_f64().is_some());

    // Fine-tuning the exported (f16) file: a new run starts from it; another preset is refused before
    // anything is written, with the differing settings named.
    let tuned = tmp.path().join("tuned");
    let out = ov3(&[
        "train",
        "--config",
        recipe_s,
        "--init",
        exported_s,
        "--out",
        tuned.to_str().unwrap(),
        "--backend",
        "cpu",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success() && stdout.contains("finished 6 steps"), "fine-tuning failed: {stderr}");
    assert!(stderr.contains(&format!("initialised from {exported_s}")), "{stderr}");
    let small = tmp.path().join("small");
    let out = ov3(&[
        "train",
        "--config",
        recipe_s,
        "--preset",
        "small",
        "--init",
        exported_s,
        "--out",
        small.to_str().unwrap(),
        "--backend",
        "cpu",
    ]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success() && stderr.contains("init model's model is not the config's"), "{stderr}");
    assert!(stderr.contains("encoder:") && !stderr.contains("panicked") && !small.exists(), "{stderr}");

    // The model file names its VAE (the embedded one here): another autoencoder is refused, both named.
    let other = fixture("taef1_original");
    let out = ov3(&["eval", "--model", exported_s, "--vae", other.to_str().unwrap(), "--n", "4", "--res", "32"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "a model evaluated with another VAE must fail");
    assert!(
        stderr.contains("ov3 embedded autoencoder") && stderr.contains("TAEF1 (width") && !stderr.contains("panicked"),
        "the refusal names both autoencoders: {stderr}"
    );
}

#[test]
fn ablate_synergy_measures_every_term_of_every_run_and_resumes() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let dir = tmp.path().join("synergy");
    let args = ["ablate", "synergy", "--steps", "6", "--eval-size", "16", "--out", dir.to_str().unwrap()];
    let stdout = ov3_ok(&args);
    assert!(stdout.contains("rec_only") && stdout.contains("und_only"), "{stdout}");
    assert!(dir.join("synergy.png").is_file());
    let read = || std::fs::read_to_string(dir.join("synergy.json")).expect("synergy.json");
    let first = read();
    let json: serde_json::Value = serde_json::from_str(&first).unwrap();
    let at = |run: &str, key: &str| -> Vec<f64> {
        let values = json["runs"][run][key].as_array().unwrap_or_else(|| panic!("runs.{run}.{key} missing"));
        values.iter().map(|v| v.as_f64().unwrap_or_else(|| panic!("runs.{run}.{key} has {v}"))).collect()
    };
    for run in ["full", "rec_only", "und_only"] {
        assert_eq!(at(run, "step"), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "{run}: every step is logged");
        assert!(json["runs"][run]["pixel"].as_array().unwrap().iter().all(|v| v.is_null()), "no pixel term asked");
        for key in ["rec", "latent", "con", "cap"] {
            let v = at(run, key);
            assert!(v.len() == 6 && v.iter().all(|x| x.is_finite() && *x > 0.0), "{run}.{key}: {v:?}");
            // Same weights, data and noise: the first step's losses (before any update) agree across runs.
            let full = at("full", key)[0];
            assert!((v[0] - full).abs() <= 1e-5 * full, "{run}.{key} starts at {} but full at {full}", v[0]);
        }
    }
    // The objective changes the updates: by the last step the runs differ.
    assert_ne!(at("rec_only", "con")[5], at("full", "con")[5]);
    assert_ne!(at("und_only", "latent")[5], at("full", "latent")[5]);
    // Rerun: every run is finished, nothing retrains, the same summary.
    let out = ov3(&[&args[..], &["--backend", "cpu"]].concat());
    let (_, stderr) = text(&out);
    assert!(out.status.success() && stderr.matches("finished earlier").count() == 3, "{stderr}");
    assert_eq!(read(), first);
}

/// The decoder-size ablation (Fig. 6): each size trains its own decoder (recorded in the run's config) and
/// every loss term is measured at every step; a size that is not WIDTHxDEPTH is refused before training.
#[test]
fn ablate_decoder_trains_each_size_and_records_it() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let dir = tmp.path().join("decoder");
    let d = dir.to_str().unwrap();
    let out = ov3(&["ablate", "decoder", "--steps", "3", "--eval-size", "8", "--sizes", "100x2", "--out", d]);
    assert!(!out.status.success() && text(&out).1.contains("'100x2' is not WIDTHxDEPTH"), "{}", text(&out).1);
    ov3_ok(&["ablate", "decoder", "--steps", "3", "--eval-size", "8", "--sizes", "64x1,128x2", "--out", d]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("decoder.json")).expect("decoder.json")).unwrap();
    for (run, width, depth) in [("decoder-64x1", 64, 1), ("decoder-128x2", 128, 2)] {
        let steps = json["runs"][run]["step"].as_array().unwrap_or_else(|| panic!("{run}: no steps"));
        assert_eq!(steps.len(), 3, "{run}: every step logged");
        let config = std::fs::read_to_string(dir.join(run).join("seed-0").join("config.toml")).expect("config");
        let recipe: ov3_core::train::TrainConfig = toml::from_str(&config).expect("a recipe");
        let decoder = recipe.decoder.unwrap_or_else(|| panic!("{run}: no decoder in {config}"));
        assert_eq!((decoder.width, decoder.depth, decoder.heads), (width, depth, width / 64), "{run}");
    }
    // Different decoders from the same encoder initialisation: the reconstruction losses differ at once.
    assert_ne!(json["runs"]["decoder-64x1"]["rec"][0], json["runs"]["decoder-128x2"]["rec"][0]);
    assert!(dir.join("decoder.png").is_file());
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_resume_finishes_the_run() {
    a_signal_writes_a_checkpoint_and_resume_finishes_the_run("INT");
}

/// `docker stop`, `kill` and Slurm preemption send SIGTERM: it must save like Ctrl-C does (it used to
/// kill the run outright, losing up to `checkpoint_every` steps).
#[test]
fn sigterm_writes_a_checkpoint_and_resume_finishes_the_run() {
    a_signal_writes_a_checkpoint_and_resume_finishes_the_run("TERM");
}

fn a_signal_writes_a_checkpoint_and_resume_finishes_the_run(signal: &str) {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let recipe = tmp.path().join("recipe.toml");
    // Long enough that the interrupt lands mid-run (it is sent after step 2).
    std::fs::write(&recipe, TINY_RECIPE.replace("steps = 4", "steps = 30").replace("eval_every = 3", "eval_every = 0"))
        .unwrap();
    let run = tmp.path().join("run");
    let (run_s, recipe_s) = (run.to_str().unwrap(), recipe.to_str().unwrap());
    let child = Command::new(env!("CARGO_BIN_EXE_ov3"))
        .args(["train", "--config", recipe_s, "--out", run_s, "--backend", "cpu"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ov3 starts");
    let metrics = run.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
        assert!(started.elapsed().as_secs() < 120, "no training steps logged within 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let kill = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().expect("kill runs");
    assert!(kill.success());
    let out = child.wait_with_output().expect("ov3 exits");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "SIG{signal} should exit cleanly: {stderr}");
    assert!(stdout.contains("interrupted at step") && stdout.contains("--resume"), "{stdout}");
    // The checkpoint is the step the signal interrupted, not the last periodic one (checkpoint_every is
    // larger than the run).
    let step: u64 =
        stdout.split("interrupted at step ").nth(1).and_then(|s| s.split(';').next()).unwrap().parse().unwrap();
    assert!(step >= 2, "{stdout}");
    assert!(run.join(format!("checkpoints/step-{step:08}/checksums.json")).is_file(), "no checkpoint of step {step}");
    // The resumed run picks up the saved config and finishes.
    let resumed = ov3_ok(&["train", "--out", run_s, "--resume"]);
    assert!(resumed.contains("finished 32 steps"), "{resumed}");
}

/// The demo checkpoint in assets/ serves every model command with no --run or --model, and it has learned
/// something: held-out retrieval far above chance.
#[test]
fn the_shipped_demo_checkpoint_works_without_training() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let json = tmp.path().join("eval.json");
    ov3_ok(&[
        "eval",
        "--data",
        "synthetic:64:0:heldout",
        "--res",
        "128",
        "--captions",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let chance_at_5 = 5.0 / 64.0;
    for key in ["i2t_recall_at_5", "t2i_recall_at_5"] {
        let r = report[key].as_f64().unwrap();
        assert!(r > 3.0 * chance_at_5, "{key} = {r}, chance is {chance_at_5}");
    }
    let photo = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/photos/rocket.jpg");
    let rec = tmp.path().join("rec.png");
    let out = ov3_ok(&["reconstruct", "--image", photo, "--noise", "0.25", "--out", rec.to_str().unwrap()]);
    assert!(out.contains("psnr") && rec.is_file(), "{out}");
    assert!(!ov3_ok(&["caption", "--image", photo]).trim().is_empty());
}

/// The shipped demo checkpoint on the four photographs of assets/photos (in no training set): it was trained
/// on real photographs too, so it reconstructs them at 25.7 dB on average (deterministic on one machine; the
/// world-only checkpoint before it gave 14.8 dB and the issue that replaced it 12.1 dB on a portrait).
#[test]
fn the_shipped_demo_checkpoint_reconstructs_photographs() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let json = tmp.path().join("eval.json");
    let photos = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/photos");
    ov3_ok(&["eval", "--data", photos, "--res", "128", "--captions", "0", "--json", json.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let (ours, vae) = (report["psnr"].as_f64().unwrap(), report["psnr_vae"].as_f64().unwrap());
    assert!(ours > 20.5, "the demo checkpoint reconstructs the photographs at {ours:.2} dB (VAE alone {vae:.2} dB)");
    // Every photograph is listed (fewer than WORST_SHOWN), and each beats the 8x block average of its own crop
    // (+5.22 dB at least with the refine-22 checkpoint; the world-only one lost 2-3 dB to it on every photo).
    let worst = report["worst_block8"].as_array().expect("worst_block8");
    assert_eq!(worst.len(), 4, "{worst:?}");
    let margins: Vec<f64> =
        worst.iter().map(|w| w["psnr"].as_f64().unwrap() - w["psnr_block8"].as_f64().unwrap()).collect();
    let mean = worst.iter().map(|w| w["psnr"].as_f64().unwrap()).sum::<f64>() / 4.0;
    assert!((mean - ours).abs() < 1e-9, "the per-image PSNRs average to the report's: {mean} vs {ours}");
    assert!((margins[0] - report["psnr_min_margin_block8"].as_f64().unwrap()).abs() < 1e-9, "{margins:?}");
    assert!(
        margins.windows(2).all(|m| m[0] <= m[1]) && margins[0] > 0.0,
        "margins over the block average: {margins:?}"
    );
    // `ov3 reconstruct` of one photograph prints the same three numbers as its row in the evaluation (two code
    // paths: one image through the CLI, a batch through `evaluate`; 2 decimals printed).
    let rocket = worst.iter().find(|w| w["caption"].as_str().unwrap().contains("rocket")).expect("rocket listed");
    let photo = format!("{photos}/rocket.jpg");
    let rec = tmp.path().join("rocket.png");
    let line = ov3_ok(&["reconstruct", "--image", &photo, "--res", "128", "--out", rec.to_str().unwrap()]);
    let printed: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|t| t.contains('.') && t.len() > 2)
        .take(3)
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(printed.len(), 3, "{line}");
    for (key, got) in ["psnr", "psnr_vae", "psnr_block8"].iter().zip(&printed) {
        let want = rocket[*key].as_f64().unwrap();
        assert!((got - want).abs() <= 0.006, "{key}: reconstruct printed {got}, eval {want}: {line}");
    }
}

/// An installed binary (`R/bin/ov3` with the model copied to `R/share/ov3/`) finds the demo checkpoint there
/// before the source tree; `OV3_DEMO_MODEL` wins over both, and a missing one is named in the error.
#[test]
fn an_installed_binary_finds_the_demo_checkpoint_in_its_share_folder() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let (bin, share) = (tmp.path().join("bin"), tmp.path().join("share/ov3"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&share).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_ov3"), bin.join("ov3")).unwrap();
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/demo/ov3-tiny-demo.safetensors");
    std::fs::copy(demo, share.join("ov3-tiny-demo.safetensors")).unwrap();
    let photo = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/photos/rocket.jpg");
    let run = |env: Option<&str>| {
        let mut c = Command::new(bin.join("ov3"));
        c.args(["caption", "--image", photo, "--backend", "cpu"]).env_remove("OV3_DEMO_MODEL");
        if let Some(v) = env {
            c.env("OV3_DEMO_MODEL", v);
        }
        c.output().expect("runs")
    };
    let out = run(None);
    let (_, stderr) = text(&out);
    assert!(out.status.success() && stderr.contains("share/ov3/ov3-tiny-demo.safetensors"), "{stderr}");
    let out = run(Some("/no/such/model.safetensors"));
    assert!(out.status.success(), "a missing OV3_DEMO_MODEL falls through to the next place");
    std::fs::remove_file(share.join("ov3-tiny-demo.safetensors")).unwrap();
    let out = run(Some(demo));
    assert!(text(&out).1.contains(&format!("model: {demo}")), "{}", text(&out).1);
}

/// `kill -9` at moments spread over a run that checkpoints every step (so many kills land inside a
/// checkpoint write): every resume finds an intact checkpoint, the run finishes with the step count of a
/// straight run, and no temporary folder of an interrupted write is left behind.
#[test]
fn kill_9_during_checkpoints_never_loses_the_run() {
    let tmp = ov3_core::fsio::ScratchDir::new().expect("tmp");
    let recipe = tmp.path().join("recipe.toml");
    let text_recipe = TINY_RECIPE
        .replace("steps = 4", "steps = 16")
        .replace("eval_every = 3", "eval_every = 0")
        .replace("checkpoint_every = 2", "checkpoint_every = 1");
    std::fs::write(&recipe, text_recipe).unwrap();
    let run = tmp.path().join("run");
    let (run_s, recipe_s) = (run.to_str().unwrap(), recipe.to_str().unwrap());
    let checkpoints = run.join("checkpoints");
    for (k, delay_ms) in [0u64, 130, 260, 390, 520].into_iter().enumerate() {
        let mut args = vec!["train", "--out", run_s, "--backend", "cpu"];
        if k == 0 {
            args.extend(["--config", recipe_s]);
        } else {
            args.push("--resume");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_ov3"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("ov3 starts");
        // Wait for this process to log a step (its checkpoint write follows at once), then a little longer.
        let metrics = run.join("metrics.jsonl");
        let lines = || std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count());
        let before = lines();
        let started = std::time::Instant::now();
        while lines() <= before && child.try_wait().unwrap().is_none() {
            assert!(started.elapsed().as_secs() < 120, "no step logged within 2 minutes");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = Command::new("kill").args(["-KILL", &child.id().to_string()]).status();
        let _ = child.wait();
    }
    let out = ov3(&["train", "--out", run_s, "--resume"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "the resume after five kills failed: {stderr}");
    assert!(stdout.contains("finished 18 steps"), "{stdout}");
    let leftovers: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left: {leftovers:?}");
}
