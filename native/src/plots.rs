//! PNG plots of a run from its `metrics.jsonl`: every loss term, the learning rate and the gradient norm
//! (`plots/training.png`), and the held-out metrics over time (`plots/eval.png`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use image::RgbImage;
use plotters::prelude::*;

use ov3_core::train::log::{METRICS_FILE, Record, StepRecord};

/// DejaVu Sans Mono, shipped in assets/ (licence next to it): plots render the same on every machine.
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
const FONT_NAME: &str = "ov3-mono";

/// One line of a panel: its legend name, its points, and optionally a shaded band `(x, low, high)` around it
/// (the spread over seeds).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
}

impl Series {
    pub fn line(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.to_string(), points, band: vec![] }
    }
}

fn register_font() -> anyhow::Result<()> {
    plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT).map_err(|_| anyhow::anyhow!("bad plot font"))
}

/// Draws the run's plots and returns their paths.
pub fn plot_run(run: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let records = ov3_core::train::log::read(&run.join(METRICS_FILE))?;
    let steps: Vec<&StepRecord> =
        records.iter().filter_map(|r| if let Record::Step(s) = r { Some(s) } else { None }).collect();
    let dir = run.join("plots");
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let mut written = vec![];

    let mut panels: Vec<(String, Vec<Series>)> = vec![];
    for name in ["total", "rec", "latent_l1", "pixel_l1", "lpips", "und", "caption", "contrastive"] {
        let points: Vec<(f64, f64)> = steps
            .iter()
            .filter_map(|s| s.terms().into_iter().find(|(n, _)| *n == name).map(|(_, v)| (s.step as f64, v)))
            .collect();
        if !points.is_empty() {
            panels.push((format!("loss: {name}"), vec![Series::line(name, points)]));
        }
    }
    let per_step = |f: fn(&StepRecord) -> f64| steps.iter().map(|s| (s.step as f64, f(s))).collect::<Vec<_>>();
    panels.push(("learning rate".into(), vec![Series::line("lr", per_step(|s| s.lr))]));
    panels.push(("gradient norm (before clipping)".into(), vec![Series::line("norm", per_step(|s| s.grad_norm))]));
    written.push(draw(&dir.join("training.png"), &panels)?);

    let evals: Vec<(u64, &ov3_core::eval::EvalReport)> = records
        .iter()
        .filter_map(|r| if let Record::Eval { step, report } = r { Some((*step, report)) } else { None })
        .collect();
    if !evals.is_empty() {
        let series = |name: &str, f: fn(&ov3_core::eval::EvalReport) -> Option<f64>| -> Series {
            Series::line(name, evals.iter().filter_map(|(s, r)| f(r).map(|v| (*s as f64, v))).collect())
        };
        let panels = vec![
            (
                "held-out PSNR (dB)".to_string(),
                vec![series("ov3", |r| Some(r.psnr)), series("VAE only", |r| Some(r.psnr_vae))],
            ),
            (
                "held-out SSIM".to_string(),
                vec![series("ov3", |r| Some(r.ssim)), series("VAE only", |r| Some(r.ssim_vae))],
            ),
            (
                "retrieval recall@1".to_string(),
                vec![
                    series("image->text", |r| Some(r.i2t_recall_at_1)),
                    series("text->image", |r| Some(r.t2i_recall_at_1)),
                    series("chance", |r| Some(r.chance_recall_at_1)),
                ],
            ),
            (
                "zero-shot accuracy".to_string(),
                vec![series("ov3", |r| r.zero_shot_accuracy), series("chance", |r| r.zero_shot_chance)],
            ),
            ("held-out caption loss (nats/token)".to_string(), vec![series("caption", |r| Some(r.caption_loss))]),
        ];
        written.push(draw(&dir.join("eval.png"), &panels)?);
    }
    Ok(written)
}

/// Panels in a grid of two columns, each a line chart over steps.
pub fn draw(path: &Path, panels: &[(String, Vec<Series>)]) -> anyhow::Result<PathBuf> {
    register_font()?;
    let rows = panels.len().div_ceil(2).max(1);
    let (w, h) = (1200u32, 300 * rows as u32);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((rows, 2));
        for ((title, series), area) in panels.iter().zip(areas) {
            panel(&area, title, series)?;
        }
        root.present()?;
    }
    let img = RgbImage::from_raw(w, h, buffer).context("plot buffer size")?;
    ov3_core::image_io::save_png(&img, path)?;
    Ok(path.to_path_buf())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    series: &[Series],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let lines = series.iter().flat_map(|s| s.points.iter().copied());
    let bands = series.iter().flat_map(|s| s.band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in lines.chain(bands).filter(|(_, y)| y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return Ok(()); // nothing to draw
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT_NAME, 16))
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
    chart.configure_mesh().label_style((FONT_NAME, 11)).x_desc("step").axis_desc_style((FONT_NAME, 11)).draw()?;
    let colours = [BLUE, RED, BLACK, GREEN];
    for (i, s) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        if !s.band.is_empty() {
            // The band's outline: along the highs, back along the lows.
            let highs = s.band.iter().map(|&(x, _, hi)| (x, hi));
            let lows = s.band.iter().rev().map(|&(x, lo, _)| (x, lo));
            let outline: Vec<(f64, f64)> = highs.chain(lows).filter(|(_, y)| y.is_finite()).collect();
            chart.draw_series(std::iter::once(Polygon::new(outline, colour.mix(0.2).filled())))?;
        }
        let (name, pts) = (&s.name, &s.points);
        chart
            .draw_series(LineSeries::new(pts.iter().copied().filter(|(_, y)| y.is_finite()), colour.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .label_font((FONT_NAME, 11))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}
