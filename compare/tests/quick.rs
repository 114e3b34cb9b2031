//! Runs every experiment in `--quick` mode through the real backends and
//! checks the JSON document against its schema (see `src/report.rs`).

use serde_json::Value;
use std::process::Command;

fn number_or_null(row: &Value, key: &str) -> Option<f64> {
    let v = &row[key];
    assert!(
        v.is_number() || v.is_null(),
        "`{key}` must be a number or null in {row}"
    );
    v.as_f64()
}

#[test]
fn quick_suite_writes_a_valid_report() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_compare"))
        .args(["all", "--quick", "--json"])
        .arg(&json_path)
        .arg("--out")
        .arg(dir.path().join("report"))
        .output()
        .expect("running compare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "compare failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("table1"), "{stdout}");

    let doc: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(doc["schema"], "microfaas-compare");
    assert_eq!(doc["schema_version"], 1);
    for key in ["cpu_model", "kernel", "git_revision", "date"] {
        assert!(doc["environment"][key].is_string(), "environment.{key} in {doc}");
    }
    assert!(doc["environment"]["cores"].as_u64().unwrap() >= 1);

    let rows = doc["rows"].as_array().expect("top-level rows");
    let expected: &[(&str, &[&str])] = &[
        ("process", &["warm", "cold"]),
        ("language", &["warm", "cold"]),
        ("vm", &["hot", "reset", "argument", "function", "base", "cold"]),
    ];
    for (backend, starts) in expected {
        for start in *starts {
            let row = rows
                .iter()
                .find(|r| r["backend"] == *backend && r["start"] == *start)
                .unwrap_or_else(|| panic!("no row for {backend} {start}"));
            let median = number_or_null(row, "median_us");
            let p99 = number_or_null(row, "p99_us");
            let p999 = number_or_null(row, "p999_us");
            let tput = number_or_null(row, "throughput_per_s");
            match row["skipped"].as_str() {
                Some(reason) => {
                    assert!(!reason.is_empty());
                    assert!(median.is_none() && p99.is_none() && p999.is_none());
                }
                None => {
                    let (m, p, pp) = (median.unwrap(), p99.unwrap(), p999.unwrap());
                    assert!(m > 0.0 && m <= p && p <= pp, "{row}");
                    assert_eq!(row["errors"], 0, "{row}");
                    assert!(row["samples"].as_u64().unwrap() > 0);
                    if *start == "warm" || *start == "hot" || *start == "reset" {
                        assert!(tput.unwrap() > 0.0, "{row}");
                    } else {
                        assert!(tput.is_none(), "{row}");
                    }
                }
            }
        }
    }
    // The process baseline always runs on Linux.
    for start in ["warm", "cold"] {
        let row = rows
            .iter()
            .find(|r| r["backend"] == "process" && r["start"] == start)
            .unwrap();
        assert!(row["skipped"].is_null(), "process {start} was skipped: {row}");
    }

    let memory = doc["memory"].as_array().expect("memory rows");
    assert!(
        memory
            .iter()
            .any(|r| r["backend"] == "process" && r["memory_mib"].as_f64().is_some_and(|m| m > 0.0))
    );
    // language with several tenants: a worker per tenant, all live.
    let tenants = memory
        .iter()
        .find(|r| r["backend"] == "language" && r["tenants"].as_u64().is_some_and(|t| t > 1))
        .expect("a language memory row with tenants");
    assert!(tenants["skipped"].is_null(), "{tenants}");
    assert!(
        tenants["workers"].as_u64().unwrap() >= tenants["tenants"].as_u64().unwrap(),
        "{tenants}"
    );
    for key in ["per_tenant_mib", "workers_pss_mib"] {
        assert!(
            number_or_null(tenants, key).is_some_and(|m| m > 0.0),
            "{key} in {tenants}"
        );
    }

    // Figure 2: the language modes, and the vm watchdog for comparison.
    let preemption = doc["preemption"].as_array().expect("preemption rows");
    let find = |backend: &str, mode: &str, quantum: Option<u64>| {
        preemption
            .iter()
            .find(|r| r["backend"] == backend && r["mode"] == mode && r["quantum_us"].as_u64() == quantum)
            .unwrap_or_else(|| panic!("no preemption row {backend} {mode} {quantum:?}"))
    };
    let none = find("language", "none", None);
    assert_eq!(none["relative_pct"].as_f64(), Some(100.0), "{none}");
    find("language", "watchdog", None);
    for q in [100, 50, 20, 10, 5, 3] {
        let row = find("language", "periodic", Some(q));
        assert!(
            row["skipped"].is_string() || row["blocks_per_s"].as_f64().is_some(),
            "{row}"
        );
    }
    if doc["environment"]["kvm_usable"] == true {
        let row = find("vm", "none", None);
        assert!(row["skipped"].is_null(), "{row}");
        assert!(row["blocks_per_s"].as_f64().unwrap() > 0.0, "{row}");
        // The 100 us watchdog row measures, or (on a loaded host, where a
        // hot vm call itself takes over 100 us) reports that the watchdog
        // stopped every call: either way the watchdog ran. Speed is not a
        // test's business.
        let row = find("vm", "watchdog", None);
        assert!(
            row["blocks_per_s"].as_f64().is_some_and(|b| b > 0.0)
                || row["skipped"]
                    .as_str()
                    .is_some_and(|s| s.contains("exceeded its budget")),
            "{row}"
        );
        assert_eq!(find("vm", "none", None)["relative_pct"].as_f64(), Some(100.0));
    }

    let report = dir.path().join("report");
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    let snaps = &doc["snapshots"];
    assert!(
        snaps["levels"].is_array() && snaps["nodes"].is_array(),
        "snapshots in {doc}"
    );
    if doc["environment"]["kvm_usable"] == true {
        assert!(snaps["skipped"].is_null(), "snapshots skipped: {snaps}");
        for level in snaps["levels"].as_array().unwrap() {
            assert!(level["skipped"].is_null(), "{level}");
            assert!(level["end_to_end"]["median_us"].as_f64().unwrap() > 0.0, "{level}");
        }
        let levels: Vec<&str> = snaps["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["level"].as_str())
            .collect();
        for wanted in ["base", "function", "argument"] {
            assert!(levels.contains(&wanted), "no {wanted} node in {snaps}");
        }
        // Density: steps 1, 10, 50 (--quick), each with its start latency
        // and memory per instance; then hot invocations with all of them idle.
        let density = &snaps["density"];
        assert!(
            density["skipped"].is_null() && density["stopped"].is_null(),
            "{density}"
        );
        let steps = density["steps"].as_array().unwrap();
        let counts: Vec<u64> = steps.iter().map(|s| s["instances"].as_u64().unwrap()).collect();
        assert_eq!(counts, [1, 10, 50], "{density}");
        for step in steps {
            assert!(step["start_us"]["median_us"].as_f64().unwrap() > 0.0, "{step}");
            let per = &step["per_instance"];
            for key in [
                "guest_private_kib",
                "process_private_kib",
                "kernel_kib",
                "host_kib",
                "fds",
                "threads",
            ] {
                assert!(per[key].as_f64().unwrap() >= 0.0, "{key} in {step}");
            }
            assert!(step["mem_available_mib"].as_u64().unwrap() > 0, "{step}");
        }
        assert_eq!(density["instances_reported"], 50, "{density}");
        assert_eq!(density["hot_invocations"], 50, "{density}");
        assert!(density["hot_us"]["median_us"].as_f64().unwrap() > 0.0, "{density}");
        assert!(md.contains("density.svg"), "{md}");
        let svg = std::fs::read_to_string(report.join("density.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("idle instances"),
            "not the density plot"
        );
    }

    // language: cold starts by path (snapshot, pre-linked, load) with both
    // function counts, init-heavy with and without its snapshot, warm rows
    // with throughput, and the worker's footprint.
    let lang = &doc["language"];
    let lrows = lang["rows"].as_array().expect("language rows");
    let lfind = |function: &str, start: &str, mode: &str, fns: u64| {
        lrows
            .iter()
            .find(|r| {
                r["function"] == function && r["start"] == start && r["mode"] == mode && r["functions_deployed"] == fns
            })
            .unwrap_or_else(|| panic!("no language row {function} {start} {mode} {fns} in {lang}"))
    };
    for fns in [8, 200] {
        let row = lfind("noop", "cold", "snapshot", fns);
        assert!(row["skipped"].is_null(), "{row}");
        assert!(row["dispatch"]["median_us"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        let warm = lfind("noop", "warm", "serial", fns);
        assert!(warm["throughput_per_s"].as_f64().unwrap() > 0.0, "{warm}");
    }
    for mode in ["snapshot", "prelinked", "load"] {
        let row = lfind("init-heavy", "cold", mode, 1);
        assert!(row["dispatch"]["median_us"].as_f64().unwrap() > 0.0, "{row}");
    }
    let footprints = lang["footprints"].as_array().expect("language footprints");
    assert!(
        footprints
            .iter()
            .any(|f| f["functions_deployed"] == 200 && f["worker_mappings"].as_u64().unwrap() > 200),
        "each of 200 functions is its own image: {lang}"
    );
    assert!(md.contains("## language"), "{md}");

    assert!(md.contains("latency-cdf.svg"));
    let svg = std::fs::read_to_string(report.join("latency-cdf.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("latency"), "not an SVG plot");
    let report_json: Value = serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(report_json["schema"], "microfaas-compare");
}
