//! SVG plots (plotters): latency CDFs per backend and start path.

use crate::preemption;
use crate::table1::Row;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

fn err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// The chart both plots use: log-scaled x, linear y.
type LogChart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<LogCoord<f64>, RangedCoordf64>>;

/// Axis descriptions `(x, y)`.
type AxisNames<'s> = (&'s str, &'s str);

/// A white SVG chart with a caption, described axes and a mesh.
fn log_chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    path: &Path,
    caption: &str,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    (x_desc, y_desc): AxisNames<'_>,
) -> Result<LogChart<'a, 'b>, PlotError> {
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x.log_scale(), y)
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| err(path, e))?;
    Ok(chart)
}

/// Draws the legend and writes the file.
fn finish<'a, 'b: 'a>(
    chart: &mut LogChart<'a, 'b>,
    root: &DrawingArea<SVGBackend<'b>, Shift>,
    path: &Path,
) -> Result<(), PlotError> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))
}

/// CDFs of dispatch latency, one line per measured row, log-scaled x axis.
pub fn latency_cdf(rows: &[Row], path: &Path) -> Result<(), PlotError> {
    let series: Vec<(String, Vec<(f64, f64)>)> = rows
        .iter()
        .filter_map(|r| {
            let points = r.dispatch.as_ref()?.cdf_points();
            (!points.is_empty()).then(|| (format!("{} {}", r.backend, r.start), points))
        })
        .collect();
    let xs = || series.iter().flat_map(|(_, p)| p.iter().map(|&(x, _)| x));
    let max_x = xs().fold(1.0f64, f64::max) * 1.5;
    let min_x = xs().fold(f64::INFINITY, f64::min).clamp(0.01, max_x / 10.0) * 0.8;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    let mut chart = log_chart(
        &root,
        path,
        "Start latency: dispatch to the function's first timestamp",
        (min_x..max_x, 0.0..1.0),
        ("latency (µs, log scale)", "fraction of invocations"),
    )?;
    for (i, (label, points)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(path, e))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    finish(&mut chart, &root, path)
}

/// The Figure 2 curve: relative throughput against the timer quantum (log
/// x axis), with the watchdog mode as a dashed reference line.
pub fn preemption_curve(rows: &[preemption::Row], path: &Path) -> Result<(), PlotError> {
    #[allow(clippy::cast_precision_loss)]
    let periodic: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.quantum_us? as f64, r.relative_pct?)))
        .collect();
    let watchdog = rows.iter().find(|r| r.mode == "watchdog").and_then(|r| r.relative_pct);
    let top = periodic
        .iter()
        .map(|&(_, y)| y)
        .chain(watchdog)
        .fold(110.0f64, |a, y| a.max(y * 1.1));
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    let mut chart = log_chart(
        &root,
        path,
        "SHA-512 throughput under preemption (language backend)",
        (2.0..2000.0, 0.0..top),
        (
            "timer quantum (µs, log scale)",
            "throughput relative to no preemption (%)",
        ),
    )?;
    let blue = PALETTE[0];
    chart
        .draw_series(LineSeries::new(periodic.iter().copied(), blue.stroke_width(2)))
        .map_err(|e| err(path, e))?
        .label("periodic SIGALRM (the paper's mode)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    chart
        .draw_series(periodic.iter().map(|&p| Circle::new(p, 4, blue.filled())))
        .map_err(|e| err(path, e))?;
    if let Some(w) = watchdog {
        let orange = PALETTE[1];
        chart
            .draw_series(DashedLineSeries::new(
                vec![(2.0, w), (2000.0, w)],
                8,
                6,
                orange.stroke_width(2),
            ))
            .map_err(|e| err(path, e))?
            .label("deadline watchdog, 100 µs budget (default mode)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange.stroke_width(2)));
    }
    finish(&mut chart, &root, path)
}
