//! Fixed 2-D sin-cos position embedding (MAE), computed for any grid so 128 px -> 256 px needs no
//! interpolation of learned weights.

use burn::tensor::{Device, Tensor, TensorData};

/// `[h * w, dim]`, row-major over the grid. The first half of the channels encodes the column (x),
/// the second half the row (y); each half is `[sin(p * w_i), cos(p * w_i)]` with `w_i = 10000^(-i / (dim/4))`.
pub fn sincos_2d(h: usize, w: usize, dim: usize, device: &Device) -> Tensor<2> {
    assert!(dim % 4 == 0, "sin-cos position embedding needs a width divisible by 4, got {dim}");
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|i| 10000f64.powf(-(i as f64) / quarter as f64)).collect();
    let mut data = Vec::with_capacity(h * w * dim);
    for row in 0..h {
        for col in 0..w {
            for pos in [col as f64, row as f64] {
                data.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                data.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [h * w, dim]), device)
}
