//! PNG plots with plotters' bitmap backend. Text needs a font: plotters is built without
//! fontconfig/freetype (`ab_glyph` only), and a TrueType file is looked up at run time under
//! /usr/share/fonts (DejaVu Sans first). Without one the plots are drawn without any text and the
//! report's Markdown carries the labels (it always names axes and series in the caption).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// Registers a TrueType font as "sans-serif" if one exists; returns whether text can be drawn.
pub fn init_font() -> bool {
    let mut candidates = vec![std::path::PathBuf::from(
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    )];
    if let Ok(dirs) = std::fs::read_dir("/usr/share/fonts/truetype") {
        for d in dirs.flatten() {
            if let Ok(files) = std::fs::read_dir(d.path()) {
                candidates.extend(
                    files
                        .flatten()
                        .map(|f| f.path())
                        .filter(|p| p.extension().is_some_and(|e| e == "ttf")),
                );
            }
        }
    }
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("plotting: {err:?}")
}

/// One named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

const COLORS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];

/// A line chart (x optionally logarithmic).
pub fn lines(
    path: &Path,
    text: bool,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    log_x: bool,
    series: &[Series],
) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for (x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    // No point at all (a section that did not run): plotters' axes would never finish.
    anyhow::ensure!(x0 <= x1, "no data to plot");
    if x0 >= x1 {
        x1 = x0 + 1.0;
    }
    let y1 = (y1 * 1.15).max(1.0);
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    if text {
        builder.caption(title, ("sans-serif", 22));
    }
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            let mut mesh = chart.configure_mesh();
            if text {
                mesh.x_desc(x_desc).y_desc(y_desc);
            } else {
                mesh.x_labels(0).y_labels(0);
            }
            mesh.draw().map_err(e)?;
            for (i, s) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect();
                let style = if s.dashed {
                    color.stroke_width(1)
                } else {
                    color.stroke_width(3)
                };
                let drawn = chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(e)?;
                if text {
                    drawn.label(s.name.clone()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                    });
                }
                chart
                    .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                    .map_err(e)?;
            }
            if text {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()
                    .map_err(e)?;
            }
        }};
    }
    if log_x {
        draw!(builder
            .build_cartesian_2d((x0.max(0.5)..x1 * 1.2).log_scale(), 0f64..y1)
            .map_err(e)?);
    } else {
        draw!(builder.build_cartesian_2d(x0..x1, 0f64..y1).map_err(e)?);
    }
    root.present().map_err(e)?;
    Ok(())
}

/// Grouped bars: one group per category, one bar per series (values may be NaN: no bar).
pub fn bars(
    path: &Path,
    text: bool,
    title: &str,
    y_desc: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter())
        .copied()
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max)
        .max(1.0)
        * 1.15;
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80);
    if text {
        builder.caption(title, ("sans-serif", 22));
    }
    let n = categories.len().max(1) as f64;
    let mut chart = builder.build_cartesian_2d(0f64..n, 0f64..ymax).map_err(e)?;
    let cats = categories.to_vec();
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        let fmt = move |x: &f64| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                cats.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        mesh.y_desc(y_desc)
            .x_labels(categories.len() * 2 + 1)
            .x_label_formatter(&fmt)
            .draw()
            .map_err(e)?;
    } else {
        mesh.x_labels(0).y_labels(0).draw().map_err(e)?;
    }
    let k = series.len().max(1) as f64;
    for (si, (name, values)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        let rects: Vec<Rectangle<(f64, f64)>> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(ci, v)| {
                let left = ci as f64 + 0.1 + 0.8 * si as f64 / k;
                Rectangle::new([(left, 0.0), (left + 0.8 / k, *v)], color.filled())
            })
            .collect();
        let drawn = chart.draw_series(rects).map_err(e)?;
        if text {
            drawn.label(name.clone()).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled())
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}
