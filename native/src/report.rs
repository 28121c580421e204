//! The evaluation report as a table on stdout.

use ov3_core::eval::EvalReport;

pub fn print_report(r: &EvalReport) {
    println!("evaluation on {} ({} images at {} px)", r.data, r.n, r.resolution);
    let rows: Vec<(&str, String)> = vec![
        (
            "PSNR (dB), ov3 / VAE only / 8x block average",
            format!(
                "{:.2} / {:.2} / {} (worst image {})",
                r.psnr,
                r.psnr_vae,
                r.psnr_block8.map_or("-".into(), |v| format!("{v:.2}")),
                r.psnr_min_margin_block8.map_or("-".into(), |v| format!("{v:+.2} dB against it"))
            ),
        ),
        ("SSIM, ov3 / VAE only", format!("{:.4} / {:.4}", r.ssim, r.ssim_vae)),
        ("LPIPS, ov3", r.lpips.map_or("- (no LPIPS weights)".into(), |v| format!("{v:.4}"))),
        ("image->text recall@1 / @5", format!("{:.3} / {:.3}", r.i2t_recall_at_1, r.i2t_recall_at_5)),
        ("text->image recall@1 / @5", format!("{:.3} / {:.3}", r.t2i_recall_at_1, r.t2i_recall_at_5)),
        (
            "recall@1 by chance",
            match r.retrieval_items {
                Some(k) if k < r.n => {
                    format!("{:.3} (over the {k} items with distinct captions)", r.chance_recall_at_1)
                }
                _ => format!("{:.3}", r.chance_recall_at_1),
            },
        ),
        (
            "zero-shot accuracy (chance)",
            match (r.zero_shot_accuracy, r.zero_shot_chance) {
                (Some(a), Some(c)) => format!("{a:.3} ({c:.3})"),
                _ => "- (no labels)".into(),
            },
        ),
        ("caption loss (nats/token)", format!("{:.4}", r.caption_loss)),
    ];
    for (name, value) in rows {
        println!("  {name:<30} {value}");
    }
    if !r.worst_block8.is_empty() {
        println!("  least gain over the 8x block average (#index: ov3 / VAE only / block, dB):");
    }
    for w in &r.worst_block8 {
        println!(
            "    #{:<4} {:6.2} / {:6.2} / {:6.2} ({:+.2})  \"{}\"",
            w.index,
            w.psnr,
            w.psnr_vae,
            w.psnr_block8,
            w.psnr - w.psnr_block8,
            w.caption
        );
    }
    for c in &r.captions {
        println!("  caption: \"{}\"\n     true: \"{}\"", c.generated, c.reference);
    }
}
