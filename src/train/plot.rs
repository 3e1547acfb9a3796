//! `metrics.png`: loss, reward accuracy and reward margin against the step, train and eval,
//! drawn with a tiny rasteriser (no font files needed).

use std::path::Path;

use crate::error::{Error, Result};

const W: usize = 900;
const PANEL_H: usize = 220;
const PANELS: [(&str, &str); 3] = [
    ("LOSS", "loss"),
    ("REWARD ACCURACY", "rewards/accuracies"),
    ("REWARD MARGIN", "rewards/margins"),
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
        _ => [0, 0, 0, 0, 0],
    }
}

type Series = Vec<(f64, f64)>;

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
    let mut c = Canvas::new(W, PANEL_H * 3);
    let max_step = train.iter().chain(&eval).flatten().map(|p| p.0).fold(1.0, f64::max);
    for (i, (title, _)) in PANELS.iter().enumerate() {
        let top = (i * PANEL_H) as f64;
        let (l, r, t, b) = (70.0, W as f64 - 20.0, top + 30.0, top + PANEL_H as f64 - 25.0);
        let ys: Vec<f64> = train[i]
            .iter()
            .chain(&eval[i])
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
        let grey = [200, 200, 200];
        c.line((l, t), (l, b), [0, 0, 0], 1);
        c.line((l, b), (r, b), [0, 0, 0], 1);
        c.line((l, t), (r, t), grey, 1);
        c.text(l as i64, top as i64 + 8, 3, title, [0, 0, 0]);
        c.text(4, t as i64, 2, &format!("{hi:.3}"), [80, 80, 80]);
        c.text(4, b as i64 - 10, 2, &format!("{lo:.3}"), [80, 80, 80]);
        c.text(r as i64 - 60, b as i64 + 8, 2, &format!("{max_step:.0}"), [80, 80, 80]);
        let map = |(x, y): (f64, f64)| (l + (x / max_step) * (r - l), b - (y - lo) / (hi - lo) * (b - t));
        for (series, colour) in [(&train[i], [31, 119, 180]), (&eval[i], [214, 39, 40])] {
            for w in series.windows(2) {
                c.line(map(w[0]), map(w[1]), colour, 2);
            }
            if series.len() == 1 {
                let (x, y) = map(series[0]);
                c.line((x - 2.0, y), (x + 2.0, y), colour, 3);
            }
        }
        if !eval[i].is_empty() {
            c.text(r as i64 - 200, top as i64 + 8, 2, "TRAIN", [31, 119, 180]);
            c.text(r as i64 - 120, top as i64 + 8, 2, "EVAL", [214, 39, 40]);
        }
    }
    let file = std::fs::File::create(png_path).map_err(|e| Error::io(png_path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, (PANEL_H * 3) as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| plot_error(png_path, e))?;
    let bytes: Vec<u8> = c.px.iter().flatten().copied().collect();
    w.write_image_data(&bytes).map_err(|e| plot_error(png_path, e))?;
    Ok(())
}
