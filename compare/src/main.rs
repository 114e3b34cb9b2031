//! `compare`: the head-to-head experiments of microfaas, through the
//! `Backend` trait, with tables, versioned JSON and SVG plots.
//!
//! `cargo run --release -p compare` runs the default suite; `compare
//! EXPERIMENT [--quick] [--iterations N] [--functions N] [--json FILE] [--out DIR]`
//! one experiment (`compare table1 --functions 5000`: Table 1 at the paper's
//! scale; `compare language`: the language backend's cold-start paths and
//! post-init snapshots). See `report.rs` for the JSON schema.

mod density;
mod env;
mod http;
mod language;
mod memory;
mod plot;
mod preemption;
mod progress;
mod report;
mod snapshots;
mod stats;
mod table1;

use clap::{Parser, ValueEnum};
use microfaas::{BackendKind, Config};
use report::Report;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The experiments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Experiment {
    /// The default suite: every experiment below.
    All,
    /// The paper's Table 1 with the vm rows: start latency and throughput per backend and start path.
    Table1,
    /// Resident memory for N deployed functions on each backend.
    Memory,
    /// The paper's Figure 2: SHA-512 throughput under preemption quanta.
    Preemption,
    /// SEUSS's view: vm start latency by snapshot level, deploy time, node sizes, idle memory.
    Snapshots,
    /// The HTTP front end (`microfaas serve`) against the trait: latency per backend and start path, throughput per client count (not in `all`).
    Http,
    /// The language backend: cold start by path (load, pre-linked, post-init snapshot) for noop,
    /// init-heavy and the interpreted wasm-large-module and wasm-noop-module, warm serial and saturated
    /// throughput, mappings and memory per function (100 and 5,000).
    Language,
}

/// Head-to-head experiments: vm vs language vs process isolation.
#[derive(Debug, Parser)]
#[command(name = "compare", version, about)]
struct Cli {
    /// Which experiment to run.
    #[arg(value_enum, default_value = "all")]
    experiment: Experiment,
    /// Fewer iterations, for a fast look (and the tests).
    #[arg(long)]
    quick: bool,
    /// Measured invocations per row (default 10,000 warm/hot, 1,000 cold and snapshot starts).
    #[arg(long)]
    iterations: Option<u64>,
    /// Functions deployed for table1 (default 100; `--functions 5000` is the paper's scale) and for
    /// language (default both 100 and 5,000). On language and process each is its own artifact.
    #[arg(long)]
    functions: Option<usize>,
    /// Function counts the memory experiment deploys, comma-separated (default 100,1000; 10,50 with --quick).
    #[arg(long, value_delimiter = ',')]
    memory_functions: Option<Vec<usize>>,
    /// Tenants the memory experiment spreads its functions over on `language`
    /// (a worker per tenant per core), comma-separated (default 1,10; 1,5 with --quick).
    #[arg(long, value_delimiter = ',')]
    memory_tenants: Option<Vec<usize>>,
    /// Largest number of idle vm instances the snapshots density curve steps up to
    /// (default 2,000; 50 with --quick); stepping stops earlier if memory or the fd limit would not allow it.
    #[arg(long)]
    max_instances: Option<usize>,
    /// Backends table1 and memory run, comma-separated (default all three: process,language,vm).
    #[arg(long, value_delimiter = ',', value_parser = parse_backend)]
    backends: Option<Vec<BackendKind>>,
    /// Write the JSON document here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write report.md, report.json and the SVG plots into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    density::raise_open_files_limit();
    let environment = env::Environment::detect();
    println!("{}\n", environment.header());
    let mut report = Report::new(environment);
    let config = Config::default();
    let all = cli.experiment == Experiment::All;
    let backends = cli.backends.clone().unwrap_or_else(|| BackendKind::ALL.to_vec());
    if all || cli.experiment == Experiment::Table1 {
        let opts = table1::Options::new(cli.quick, cli.iterations, cli.functions);
        let rows = table1::run(&opts, &config, &backends);
        println!(
            "table1: noop (the vm argument row: checkpointed resuming after its checkpoint), {} functions deployed; latency from dispatch to the function's first timestamp (median/p99/p99.9) and end to end (e2e)\n{}",
            opts.functions,
            report::table1_text(&rows)
        );
        report.rows = Some(rows);
    }
    if all || cli.experiment == Experiment::Memory {
        let steps = cli
            .memory_functions
            .clone()
            .unwrap_or_else(|| memory::default_steps(cli.quick));
        let tenants = cli
            .memory_tenants
            .clone()
            .unwrap_or_else(|| memory::default_tenants(cli.quick));
        let rows = memory::run(&steps, &tenants, &config, &backends);
        println!(
            "memory: host memory of N deployed functions, each invoked once (language: spread over T tenants, a worker per tenant per core, all kept live)\n{}",
            report::memory_text(&rows)
        );
        report.memory = Some(rows);
    }
    if all || cli.experiment == Experiment::Preemption {
        let time = Duration::from_millis(if cli.quick { 200 } else { 1500 });
        let rows = preemption::run(time, &config);
        println!(
            "preemption: sha512 ({} rounds per invocation), one language worker or one hot vm instance, relative to the same backend without preemption (none)\n{}",
            preemption::ROUNDS,
            report::preemption_text(&rows)
        );
        report.preemption = Some(rows);
    }
    if all || cli.experiment == Experiment::Snapshots {
        let max = cli.max_instances.unwrap_or(if cli.quick { 50 } else { 2000 }).max(1);
        let r = snapshots::run(cli.quick, max, &config);
        println!(
            "snapshots: vm start latency to the first reply by snapshot level (fresh store)\n{}",
            report::snapshots_text(&r)
        );
        report.snapshots = Some(r);
    }
    if cli.experiment == Experiment::Http {
        let r = http::run(&http::Options::new(cli.quick, cli.iterations));
        println!(
            "http: noop and sha512 (100 rounds) through `microfaas serve` (SigV4, keep-alive, in this process) and through the trait\n{}",
            http::text(&r)
        );
        report.http = Some(r);
    }
    if all || cli.experiment == Experiment::Language {
        let opts = language::Options::new(cli.quick, cli.iterations, cli.functions);
        let r = language::run(&opts, &config);
        println!(
            "language: one worker; latency from dispatch to the function's first timestamp\n{}",
            language::text(&r)
        );
        report.language = Some(r);
    }
    let json = serde_json::to_string_pretty(&report).map_err(|e| format!("serialising the report: {e}"))?;
    if let Some(path) = &cli.json {
        std::fs::write(path, &json).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if let Some(dir) = &cli.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut plots = Vec::new();
        if let Some(rows) = &report.rows {
            plot::latency_cdf(rows, &dir.join("latency-cdf.svg")).map_err(|e| e.to_string())?;
            plots.push(("Start latency CDF".to_owned(), "latency-cdf.svg".to_owned()));
        }
        if let Some(rows) = &report.preemption {
            plot::preemption_curve(rows, &dir.join("preemption.svg")).map_err(|e| e.to_string())?;
            plots.push((
                "Throughput under preemption (Figure 2)".to_owned(),
                "preemption.svg".to_owned(),
            ));
        }
        if let Some(d) = report.snapshots.as_ref().and_then(|r| r.density.as_ref())
            && !d.steps.is_empty()
        {
            plot::density_curve(d, &dir.join("density.svg")).map_err(|e| e.to_string())?;
            plots.push(("Density of idle vm instances".to_owned(), "density.svg".to_owned()));
        }
        std::fs::write(dir.join("report.json"), &json).map_err(|e| format!("writing report.json: {e}"))?;
        std::fs::write(dir.join("report.md"), report::markdown(&report, &plots))
            .map_err(|e| format!("writing report.md: {e}"))?;
        println!("wrote {}/report.md, report.json and the plots", dir.display());
    }
    Ok(())
}
