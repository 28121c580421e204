//! The token picture of the demo (PCA of z_u): checked against data with planted principal components.

use ov3_core::data::rng::SplitMix64;
use ov3_core::inference::{pca_rgb, principal_scores, rank};

/// `n` rows of width `d`: coordinates with RMS 3, 2, 1 along three random orthonormal
/// directions, a constant offset, and noise of 0.01. Returns the rows and the planted coordinates.
fn planted(n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<Vec<f64>>) {
    let mut rng = SplitMix64::new(seed, 0);
    let mut normal = move || {
        // Box-Muller from two uniforms.
        let (u, v) = (rng.unit().max(1e-12), rng.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    let mut dirs: Vec<Vec<f64>> = Vec::new();
    while dirs.len() < 3 {
        let mut v: Vec<f64> = (0..d).map(|_| normal()).collect();
        for u in &dirs {
            let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        dirs.push(v.into_iter().map(|a| a / norm).collect());
    }
    // Centred and mutually orthogonal over the rows, so that the planted axes are exactly the principal
    // ones (independent draws are only nearly uncorrelated in a finite sample).
    let mut coords: Vec<Vec<f64>> = Vec::new();
    for s in [3.0, 2.0, 1.0] {
        let mut c: Vec<f64> = (0..n).map(|_| normal()).collect();
        let m = c.iter().sum::<f64>() / n as f64;
        c.iter_mut().for_each(|a| *a -= m);
        for u in &coords {
            let (dot, uu): (f64, f64) = (c.iter().zip(u).map(|(a, b)| a * b).sum(), u.iter().map(|a| a * a).sum());
            c.iter_mut().zip(u).for_each(|(a, b)| *a -= dot / uu * b);
        }
        let rms = (c.iter().map(|a| a * a).sum::<f64>() / n as f64).sqrt();
        coords.push(c.into_iter().map(|a| a * s / rms).collect());
    }
    let mut rows = vec![0f32; n * d];
    for i in 0..n {
        for j in 0..d {
            let value: f64 = 0.5 + (0..3).map(|k| coords[k][i] * dirs[k][j]).sum::<f64>() + 0.01 * normal();
            rows[i * d + j] = value as f32;
        }
    }
    (rows, coords)
}

#[test]
fn principal_scores_recover_planted_components_up_to_sign() {
    let (n, d) = (40, 24);
    let (rows, coords) = planted(n, d, 7);
    let scores = principal_scores(&rows, n, d, 3);
    for k in 0..3 {
        let sign = if scores[k].iter().zip(&coords[k]).map(|(a, b)| a * b).sum::<f64>() < 0.0 { -1.0 } else { 1.0 };
        let err = scores[k].iter().zip(&coords[k]).map(|(s, c)| (sign * s - c).abs()).fold(0.0, f64::max);
        // The noise (0.01 per entry) bounds how well any method can recover the coordinates.
        assert!(err < 0.05, "component {k}: max abs error {err}");
    }
}

#[test]
fn pca_colours_span_the_range_and_do_not_depend_on_the_offset() {
    let (n, d) = (64, 32);
    let (rows, _) = planted(n, d, 11);
    let colours = pca_rgb(&rows, n, d);
    assert_eq!(colours.len(), n);
    for c in 0..3 {
        let (lo, hi) = colours.iter().fold((255, 0), |(lo, hi), p| (p[c].min(lo), p[c].max(hi)));
        assert_eq!((lo, hi), (0, 255), "channel {c} is min-max scaled over the tokens");
    }
    let shifted: Vec<f32> = rows.iter().map(|v| v + 10.0).collect();
    assert_eq!(pca_rgb(&shifted, n, d), colours, "PCA centres the tokens");
    let constant = vec![1.0f32; n * d];
    assert!(pca_rgb(&constant, n, d).iter().all(|p| *p == [128, 128, 128]), "no variance: mid grey");
}

#[test]
fn rank_orders_by_cosine_similarity() {
    let image = [0.6f32, 0.8];
    let texts = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![-1.0, 0.0]];
    let order: Vec<usize> = rank(&image, &texts).iter().map(|(i, _)| *i).collect();
    assert_eq!(order, vec![1, 0, 2]);
}
