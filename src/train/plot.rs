//! `metrics.png`: loss, reward accuracy and reward margin against the step, train and eval,
//! drawn with a tiny rasteriser (no font files needed).

use std::path::Path;

use crate::error::{Error, Result};

const W: usize = 900;
const PANEL_H: usize = 230;
/// The band above the panels: the run's name and the legend.
const HEADER_H: usize = 36;
const TRAIN: [u8; 3] = [31, 119, 180];
const EVAL: [u8; 3] = [214, 39, 40];
const GREY: [u8; 3] = [80, 80, 80];
const PANELS: [(&str, &str); 3] = [
    ("LOSS", "loss"),
    (
        "REWARD ACCURACY (FRACTION OF PAIRS, CHOSEN > REJECTED)",
        "rewards/accuracies",
    ),
    ("REWARD MARGIN (CHOSEN - REJECTED REWARD)", "rewards/margins"),
];

struct Canvas {
    px: Vec<[u8; 3]>,
    w: usize,
    h: usize,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            px: vec![[255, 255, 255]; w * h],
            w,
            h,
        }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }
    /// Text in a 3x5 pixel font scaled by `s`.
    fn text(&mut self, x: i64, y: i64, s: i64, text: &str, c: [u8; 3]) {
        let mut cx = x;
        for ch in text.chars() {
            let rows = glyph(ch.to_ascii_uppercase());
            for (ry, row) in rows.iter().enumerate() {
                for rx in 0..3 {
                    if row & (0b100 >> rx) != 0 {
                        for dx in 0..s {
                            for dy in 0..s {
                                self.set(cx + rx as i64 * s + dx, y + ry as i64 * s + dy, c);
                            }
                        }
                    }
                }
            }
            cx += 4 * s;
        }
    }
}

fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'A' => [2, 5, 7, 5, 5],
        'C' => [7, 4, 4, 4, 7],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'G' => [7, 4, 5, 5, 7],
        'I' => [7, 2, 2, 2, 7],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [7, 5, 5, 5, 7],
        'P' => [7, 5, 7, 4, 4],
        'R' => [6, 5, 6, 5, 5],
        'S' => [7, 4, 7, 1, 7],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'Y' => [5, 5, 2, 2, 2],
        'B' => [6, 5, 6, 5, 6],
        'F' => [7, 4, 6, 4, 4],
        'H' => [5, 5, 7, 5, 5],
        'K' => [5, 5, 6, 5, 5],
        'X' => [5, 5, 2, 5, 5],
        ':' => [0, 2, 0, 2, 0],
        'J' => [1, 1, 1, 5, 7],
        'Q' => [7, 5, 5, 7, 1],
        'Z' => [7, 1, 2, 4, 7],
        '_' => [0, 0, 0, 0, 7],
        '/' => [1, 1, 2, 4, 4],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '=' => [0, 7, 0, 7, 0],
        '+' => [0, 2, 7, 2, 0],
        ',' => [0, 0, 0, 2, 4],
        '>' => [4, 2, 1, 2, 4],
        '<' => [1, 2, 4, 2, 1],
        _ => [0, 0, 0, 0, 0],
    }
}

type Series = Vec<(f64, f64)>;

/// What the colours mean: a line sample and a name for each series.
fn legend(c: &mut Canvas, x: i64, y: i64, with_eval: bool) {
    let mut at = x as f64;
    let items: &[(&str, [u8; 3])] = if with_eval {
        &[("TRAIN (WINDOW MEAN)", TRAIN), ("EVAL", EVAL)]
    } else {
        &[("TRAIN (WINDOW MEAN)", TRAIN)]
    };
    for (name, colour) in items {
        c.line((at, y as f64 + 5.0), (at + 24.0, y as f64 + 5.0), *colour, 3);
        c.text(at as i64 + 30, y, 2, name, *colour);
        at += 30.0 + 8.0 * name.len() as f64 + 24.0;
    }
}

/// A short label for a tick value.
fn tick_label(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// One panel: axes, ticks with values and grid lines, the "STEP" axis label, the curves.
fn panel(c: &mut Canvas, top: f64, title: &str, train: &Series, eval: &Series, max_step: f64) {
    let (l, r, t, b) = (80.0, W as f64 - 20.0, top + 30.0, top + PANEL_H as f64 - 40.0);
    let ys: Vec<f64> = train
        .iter()
        .chain(eval)
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .collect();
    let (mut lo, mut hi) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| (a.min(y), b.max(y)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let grid = [225, 225, 225];
    c.text(l as i64, top as i64 + 8, 3, title, [0, 0, 0]);
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        // y ticks: value labels left of the axis, grid lines across
        let y = b - f * (b - t);
        c.line((l, y), (r, y), grid, 1);
        c.line((l - 5.0, y), (l, y), [0, 0, 0], 1);
        c.text(6, y as i64 - 5, 2, &tick_label(lo + f * (hi - lo)), GREY);
        // x ticks: steps below the axis
        let x = l + f * (r - l);
        c.line((x, b), (x, b + 5.0), [0, 0, 0], 1);
        let label = format!("{:.0}", f * max_step);
        c.text(x as i64 - 4 * label.len() as i64, b as i64 + 9, 2, &label, GREY);
    }
    c.line((l, t), (l, b), [0, 0, 0], 1);
    c.line((l, b), (r, b), [0, 0, 0], 1);
    c.text(((l + r) / 2.0) as i64 - 16, b as i64 + 24, 2, "STEP", [0, 0, 0]);
    let map = |(x, y): (f64, f64)| (l + (x / max_step) * (r - l), b - (y - lo) / (hi - lo) * (b - t));
    for (series, colour) in [(train, TRAIN), (eval, EVAL)] {
        for w in series.windows(2) {
            c.line(map(w[0]), map(w[1]), colour, 2);
        }
        if series.len() == 1 {
            let (x, y) = map(series[0]);
            c.line((x - 2.0, y), (x + 2.0, y), colour, 3);
        }
    }
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Plot {
        path: path.into(),
        msg: e.to_string(),
    }
}

/// Read metrics.jsonl and draw the three panels into `png_path`.
pub fn write_plot(jsonl: &Path, png_path: &Path) -> Result<()> {
    let text = crate::error::read_to_string(jsonl)?;
    let mut train: Vec<Series> = vec![Vec::new(); 3];
    let mut eval: Vec<Series> = vec![Vec::new(); 3];
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| plot_error(jsonl, e))?;
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        for (i, (_, key)) in PANELS.iter().enumerate() {
            if let Some(y) = v.get(*key).and_then(|x| x.as_f64()) {
                train[i].push((step, y));
            }
            if let Some(y) = v.get(format!("eval_{key}")).and_then(|x| x.as_f64()) {
                eval[i].push((step, y));
            }
        }
    }
    let run = png_path
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut c = Canvas::new(W, HEADER_H + PANEL_H * 3);
    c.text(12, 10, 3, &format!("LORAFOLD DPO: {run}"), [0, 0, 0]);
    legend(&mut c, W as i64 - 330, 12, !eval.iter().all(Vec::is_empty));
    let max_step = train.iter().chain(&eval).flatten().map(|p| p.0).fold(1.0, f64::max);
    for (i, (title, _)) in PANELS.iter().enumerate() {
        let top = (HEADER_H + i * PANEL_H) as f64;
        panel(&mut c, top, title, &train[i], &eval[i], max_step);
    }
    let file = std::fs::File::create(png_path).map_err(|e| Error::io(png_path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, (HEADER_H + PANEL_H * 3) as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| plot_error(png_path, e))?;
    let bytes: Vec<u8> = c.px.iter().flatten().copied().collect();
    w.write_image_data(&bytes).map_err(|e| plot_error(png_path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_character_the_plot_writes_has_a_glyph() {
        let mut texts: Vec<&str> = PANELS.iter().map(|(t, _)| *t).collect();
        texts.extend([
            "LORAFOLD DPO: QWEN2-DPO-20261202-141549_V0",
            "TRAIN (WINDOW MEAN)",
            "EVAL",
            "STEP",
        ]);
        texts.push("0123456789.-");
        for t in texts {
            for ch in t.chars().filter(|c| *c != ' ') {
                assert_ne!(glyph(ch), [0; 5], "no glyph for {ch:?} in {t:?}");
            }
        }
    }

    #[test]
    fn the_plot_is_a_png_of_the_stated_size() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("metrics.jsonl");
        let mut text = String::new();
        for step in 1..=6 {
            let l = 0.7 / step as f64;
            text +=
                &format!("{{\"step\":{step},\"loss\":{l},\"rewards/accuracies\":0.5,\"rewards/margins\":{step}}}\n");
            text += &format!("{{\"step\":{step},\"eval_loss\":{l},\"eval_rewards/margins\":1.0}}\n");
        }
        std::fs::write(&jsonl, text).unwrap();
        let png_path = dir.path().join("metrics.png");
        write_plot(&jsonl, &png_path).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width as usize, info.height as usize), (W, HEADER_H + 3 * PANEL_H));
    }
}
