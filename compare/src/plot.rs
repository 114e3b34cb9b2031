//! SVG plots (plotters): latency CDFs per backend and start path, the
//! Figure-2 curve, the density curve.

use crate::table1::Row;
use crate::{density, preemption};
use microfaas::BackendKind;
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

/// Ten distinct colours: one per table1 row (nine) without repeats.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(64, 64, 64),
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

/// Draws the legend at `position`.
fn legend<'a, 'b: 'a>(
    chart: &mut LogChart<'a, 'b>,
    position: SeriesLabelPosition,
    path: &Path,
) -> Result<(), PlotError> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(path, e))
}

/// Draws the legend and writes the file.
fn finish<'a, 'b: 'a>(
    chart: &mut LogChart<'a, 'b>,
    root: &DrawingArea<SVGBackend<'b>, Shift>,
    path: &Path,
) -> Result<(), PlotError> {
    legend(chart, SeriesLabelPosition::LowerRight, path)?;
    root.present().map_err(|e| err(path, e))
}

/// One labelled line with point markers.
fn line<'a, 'b: 'a>(
    chart: &mut LogChart<'a, 'b>,
    points: &[(f64, f64)],
    color: RGBColor,
    label: &str,
    path: &Path,
) -> Result<(), PlotError> {
    chart
        .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
        .map_err(|e| err(path, e))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
        .map_err(|e| err(path, e))?;
    Ok(())
}

/// The density curve: host memory per idle instance (top) and start
/// latency (bottom) against the number of idle instances (log x axis).
pub fn density_curve(d: &density::Density, path: &Path) -> Result<(), PlotError> {
    #[allow(clippy::cast_precision_loss)]
    let series = |f: fn(&density::Row) -> f64| -> Vec<(f64, f64)> {
        d.steps.iter().map(|r| (r.instances as f64, f(r))).collect()
    };
    #[allow(clippy::cast_precision_loss)]
    let max_n = d.steps.iter().map(|r| r.instances).max().unwrap_or(1).max(10) as f64 * 1.5;
    let memory = [
        ("host (process private + kernel)", series(|r| r.per_instance.host_kib)),
        ("process private", series(|r| r.per_instance.process_private_kib)),
        (
            "kernel (Slab, stacks, page tables)",
            series(|r| r.per_instance.kernel_kib),
        ),
        ("guest pages written", series(|r| r.per_instance.guest_private_kib)),
    ];
    let latency = [
        ("median", series(|r| r.start_us.median_us / 1000.0)),
        ("p99", series(|r| r.start_us.p99_us / 1000.0)),
    ];
    let top = |s: &[(&str, Vec<(f64, f64)>)]| {
        s.iter()
            .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
            .fold(1.0f64, f64::max)
            * 1.15
    };
    let root = SVGBackend::new(path, (960, 900)).into_drawing_area();
    let (upper, lower) = root.split_vertically(450);
    let mut chart = log_chart(
        &upper,
        path,
        &format!(
            "Density: idle vm instances of {} from one function snapshot",
            d.function
        ),
        (0.8..max_n, 0.0..top(&memory)),
        ("idle instances (log scale)", "host memory per instance (KiB)"),
    )?;
    for (i, (label, points)) in memory.iter().enumerate() {
        line(&mut chart, points, PALETTE[i], label, path)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft, path)?;
    let mut chart = log_chart(
        &lower,
        path,
        "Start latency of each step's instances (restore to idle)",
        (0.8..max_n, 0.0..top(&latency)),
        ("idle instances (log scale)", "start latency (ms)"),
    )?;
    for (i, (label, points)) in latency.iter().enumerate() {
        line(&mut chart, points, PALETTE[i + 4], label, path)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft, path)?;
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
        .filter(|r| r.backend == BackendKind::Language)
        .filter_map(|r| Some((r.quantum_us? as f64, r.relative_pct?)))
        .collect();
    let watchdog = |backend| {
        rows.iter()
            .find(|r| r.backend == backend && r.mode == "watchdog")
            .and_then(|r| r.relative_pct)
    };
    let (watchdog, vm_watchdog) = (watchdog(BackendKind::Language), watchdog(BackendKind::Vm));
    let top = periodic
        .iter()
        .map(|&(_, y)| y)
        .chain(watchdog)
        .chain(vm_watchdog)
        .fold(110.0f64, |a, y| a.max(y * 1.1));
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    let mut chart = log_chart(
        &root,
        path,
        "SHA-512 throughput under preemption",
        (2.0..2000.0, 0.0..top),
        (
            "timer quantum (µs, log scale)",
            "throughput relative to no preemption (%)",
        ),
    )?;
    line(
        &mut chart,
        &periodic,
        PALETTE[0],
        "periodic SIGALRM (the paper's mode)",
        path,
    )?;
    let references = [
        (
            watchdog,
            PALETTE[1],
            "language: deadline watchdog, 100 µs budget (default mode)",
        ),
        (
            vm_watchdog,
            PALETTE[2],
            "vm: host deadline watchdog, 100 µs budget (vs a 1 s budget)",
        ),
    ];
    for (value, color, label) in references {
        let Some(w) = value else { continue };
        chart
            .draw_series(DashedLineSeries::new(
                vec![(2.0, w), (2000.0, w)],
                8,
                6,
                color.stroke_width(2),
            ))
            .map_err(|e| err(path, e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    finish(&mut chart, &root, path)
}
