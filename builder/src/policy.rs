//! What a function crate may depend on and what may run while it builds:
//! the allowlist (crates.io crates by name and version range; the SDK by its
//! path) and the pure checks of cargo metadata against it. Nothing here runs
//! cargo; the pipeline feeds it `cargo metadata` output.

use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// A crates.io crate a function may depend on (transitively, build
/// dependencies included), in a pinned version range.
#[derive(Debug, Clone, Copy)]
pub struct AllowedCrate {
    /// The package name on crates.io.
    pub name: &'static str,
    /// The versions allowed, as a semver requirement (`>=0.10, <0.11`).
    pub versions: &'static str,
}

const fn allow(name: &'static str, versions: &'static str) -> AllowedCrate {
    AllowedCrate { name, versions }
}

/// The trusted base a function may build on, as in Boucher et al.: well-kept
/// `no_std` crates from crates.io, each in a vetted version range. Identified
/// by source, name and version: a path or git dependency of the same name is
/// refused. The SDK is the one path dependency allowed (by its canonical
/// path, see [`crate::sdk_dir`]).
pub const ALLOWED_CRATES: &[AllowedCrate] = &[
    allow("once_cell", ">=1.17, <2"),
    // RustCrypto SHA-2 and its dependencies.
    allow("sha2", ">=0.10, <0.11"),
    allow("digest", ">=0.10, <0.11"),
    allow("block-buffer", ">=0.10, <0.11"),
    allow("crypto-common", ">=0.1, <0.2"),
    allow("generic-array", ">=0.14, <0.15"),
    allow("typenum", ">=1.14, <2"),
    allow("version_check", ">=0.9, <0.10"),
    allow("cpufeatures", ">=0.2, <0.4"),
    allow("cfg-if", ">=1, <2"),
    allow("hybrid-array", ">=0.2, <0.5"),
    // The wasmi WebAssembly interpreter (`no_std` + alloc, stable Rust) of
    // the interpreted functions, and its dependencies with the features
    // they use (`validate`, `libm`, no `std`). wasmi, wasmi_ir, wasmparser
    // and libm have build scripts; like typenum's and generic-array's they
    // run inside the build sandbox, never on the host.
    allow("wasmi", ">=2.0, <2.1"),
    allow("wasmi_core", ">=2.0, <2.1"),
    allow("wasmi_ir", ">=2.0, <2.1"),
    allow("wasmi_collections", ">=2.0, <2.1"),
    allow("wasmparser", ">=0.228, <0.229"),
    allow("spin", ">=0.9, <0.10"),
    allow("libm", ">=0.2, <0.3"),
    allow("bitflags", ">=2, <3"),
];

/// The source ids cargo reports for crates.io (git and sparse protocol).
pub const CRATES_IO_SOURCES: &[&str] = &[
    "registry+https://github.com/rust-lang/crates.io-index",
    "sparse+https://index.crates.io/",
];

/// A build refused before compiling anything, naming what was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The function crate has a build script.
    #[error(
        "function crate `{krate}` has a build script ({script}), which would run on the build host: build scripts are refused"
    )]
    BuildScript {
        /// The crate.
        krate: String,
        /// The script's path.
        script: String,
    },
    /// The function crate is a proc-macro crate.
    #[error("function crate `{krate}` is a proc-macro crate, which would run inside the compiler: refused")]
    ProcMacro {
        /// The crate.
        krate: String,
    },
    /// A dependency outside the allowlist.
    #[error("dependency `{krate}` ({source_desc}, via {via}) is refused: {reason}{}", runs_at_build.map(|r| format!("; it has {r}")).unwrap_or_default())]
    Dependency {
        /// The refused package's name.
        krate: String,
        /// Its source (`crates.io 1.0.5`, `path /x`, `git+file:///x`).
        source_desc: String,
        /// The dependency path that pulls it in (`f -> a -> b`).
        via: String,
        /// Why.
        reason: DependencyReason,
        /// Build-time code the crate carries (a build script, a proc-macro),
        /// when known.
        runs_at_build: Option<&'static str>,
    },
}

/// Why a dependency was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DependencyReason {
    /// Not from crates.io (path, git, another registry) and not the SDK.
    NotCratesIo,
    /// From crates.io but not on the allowlist.
    NotAllowlisted,
    /// On the allowlist, but in a version outside its range.
    VersionOutOfRange {
        /// The allowed range.
        allowed: &'static str,
    },
}

impl fmt::Display for DependencyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotCratesIo => write!(
                f,
                "only crates.io crates on the allowlist may be used (the SDK is the one path dependency allowed); allowed: {}",
                allowlist_text()
            ),
            Self::NotAllowlisted => write!(
                f,
                "it is not on the allowlist of function dependencies ({})",
                allowlist_text()
            ),
            Self::VersionOutOfRange { allowed } => write!(f, "its version is outside the allowed range {allowed}"),
        }
    }
}

fn allowlist_text() -> String {
    ALLOWED_CRATES
        .iter()
        .map(|c| format!("{} {}", c.name, c.versions))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Build-time code a package's targets carry, if any.
pub fn build_time_code(pkg: &Value) -> Option<&'static str> {
    let kinds: Vec<&str> = pkg["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["kind"].as_array().into_iter().flatten().filter_map(Value::as_str))
        .collect();
    if kinds.contains(&"proc-macro") {
        Some("a proc-macro, which would run inside the compiler")
    } else if kinds.contains(&"custom-build") {
        Some("a build script, which would run on the build host")
    } else {
        None
    }
}

fn is_crates_io(source: &str) -> bool {
    CRATES_IO_SOURCES.contains(&source)
}

/// Checks a crates.io package (name and version) against the allowlist.
pub fn check_allowed(name: &str, version: &str) -> Result<(), DependencyReason> {
    let allowed = ALLOWED_CRATES
        .iter()
        .find(|c| c.name == name)
        .ok_or(DependencyReason::NotAllowlisted)?;
    let out_of_range = DependencyReason::VersionOutOfRange {
        allowed: allowed.versions,
    };
    let req = semver::VersionReq::parse(allowed.versions).map_err(|_| out_of_range.clone())?;
    let version = semver::Version::parse(version).map_err(|_| out_of_range.clone())?;
    if req.matches(&version) {
        Ok(())
    } else {
        Err(out_of_range)
    }
}

/// The function crate as `cargo metadata --no-deps` describes it, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCrate {
    /// Package name.
    pub name: String,
    /// Its workspace root (itself when it is its own workspace).
    pub workspace_root: PathBuf,
}

/// Why the package at a manifest is not a function crate at all (as
/// opposed to a refused one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotAFunction(pub String);

/// Checks the function crate before anything is resolved or fetched: it
/// has a library target and no build script or proc-macro, and every
/// dependency it declares (normal and build, every platform) is the SDK (by
/// canonical path) or an allowlisted name from crates.io. Path dependencies
/// refused here are returned with their path so the caller can say what
/// they carry.
///
/// `canonical` resolves a declared path dependency (the caller passes
/// `fs::canonicalize`; tests a map).
pub fn check_function(
    meta: &Value,
    manifest: &Path,
    sdk_dir: &Path,
    canonical: &dyn Fn(&Path) -> Option<PathBuf>,
) -> Result<Result<FunctionCrate, Refusal>, NotAFunction> {
    let packages = meta["packages"]
        .as_array()
        .ok_or_else(|| NotAFunction("no packages".into()))?;
    let pkg = packages
        .iter()
        .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest))
        .ok_or_else(|| NotAFunction("no package at this manifest".into()))?;
    let name = pkg["name"]
        .as_str()
        .ok_or_else(|| NotAFunction("package without a name".into()))?
        .to_owned();
    let targets = pkg["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
    let has_kind = |t: &Value, kind: &str| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == kind));
    if let Some(script) = targets.iter().find(|t| has_kind(t, "custom-build")) {
        return Ok(Err(Refusal::BuildScript {
            krate: name,
            script: script["src_path"].as_str().unwrap_or("build.rs").to_owned(),
        }));
    }
    if targets.iter().any(|t| has_kind(t, "proc-macro")) {
        return Ok(Err(Refusal::ProcMacro { krate: name }));
    }
    if !targets.iter().any(|t| has_kind(t, "lib")) {
        return Err(NotAFunction("it has no library target (src/lib.rs)".into()));
    }
    for dep in pkg["dependencies"].as_array().into_iter().flatten() {
        if dep["kind"] == "dev" {
            continue;
        }
        let dep_name = dep["name"].as_str().unwrap_or_default().to_owned();
        let via = format!("{name} -> {dep_name}");
        let refuse = |source_desc: String, reason: DependencyReason| {
            Err(Refusal::Dependency {
                krate: dep_name.clone(),
                source_desc,
                via: via.clone(),
                reason,
                runs_at_build: None,
            })
        };
        if let Some(path) = dep["path"].as_str() {
            if canonical(Path::new(path)).as_deref() == Some(sdk_dir) {
                continue;
            }
            return Ok(refuse(format!("path {path}"), DependencyReason::NotCratesIo));
        }
        let source = dep["source"].as_str().unwrap_or("unknown source");
        if !is_crates_io(source) || !dep["registry"].is_null() {
            return Ok(refuse(source.to_owned(), DependencyReason::NotCratesIo));
        }
        if !ALLOWED_CRATES.iter().any(|c| c.name == dep_name) {
            return Ok(refuse("crates.io".to_owned(), DependencyReason::NotAllowlisted));
        }
    }
    let workspace_root = PathBuf::from(meta["workspace_root"].as_str().unwrap_or_default());
    Ok(Ok(FunctionCrate { name, workspace_root }))
}

/// The resolved graph of the wrapper crate, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedGraph {
    /// Directories of the local packages compiled (the function, the SDK).
    pub local_dirs: BTreeSet<PathBuf>,
    /// Every crates.io package compiled, as `name version`.
    pub registry_packages: BTreeSet<String>,
}

/// Checks every package the wrapper's resolved graph (`cargo metadata
/// --filter-platform`, normal and build edges) compiles: local packages
/// must be the function or the SDK; everything else must be an allowlisted
/// crates.io crate in its version range. The function crate must carry no
/// build script or proc-macro.
pub fn check_graph(
    meta: &Value,
    wrapper_manifest: &Path,
    function_dir: &Path,
    sdk_dir: &Path,
) -> Result<CheckedGraph, Refusal> {
    let packages = meta["packages"].as_array().map(Vec::as_slice).unwrap_or_default();
    let by_id: HashMap<&str, &Value> = packages.iter().filter_map(|p| Some((p["id"].as_str()?, p))).collect();
    let nodes: HashMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .map(|ns| ns.iter().filter_map(|n| Some((n["id"].as_str()?, n))).collect())
        .unwrap_or_default();
    let root = packages
        .iter()
        .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(wrapper_manifest));
    let root_id = root.and_then(|p| p["id"].as_str()).unwrap_or_default();
    let mut checked = CheckedGraph {
        local_dirs: BTreeSet::new(),
        registry_packages: BTreeSet::new(),
    };
    let mut seen = BTreeSet::new();
    let mut stack: Vec<(&str, String)> = vec![(root_id, String::new())];
    while let Some((id, via)) = stack.pop() {
        if !seen.insert(id.to_owned()) {
            continue;
        }
        let Some(node) = nodes.get(id) else { continue };
        for dep in node["deps"].as_array().into_iter().flatten() {
            let dev_only = dep["dep_kinds"]
                .as_array()
                .is_some_and(|ks| !ks.is_empty() && ks.iter().all(|k| k["kind"] == "dev"));
            let Some(dep_id) = dep["pkg"].as_str() else { continue };
            if dev_only || seen.contains(dep_id) {
                continue;
            }
            let Some(pkg) = by_id.get(dep_id).copied() else {
                continue;
            };
            let name = pkg["name"].as_str().unwrap_or_default();
            let version = pkg["version"].as_str().unwrap_or_default();
            let via = if via.is_empty() {
                name.to_owned()
            } else {
                format!("{via} -> {name}")
            };
            let refuse = |source_desc: String, reason: DependencyReason| Refusal::Dependency {
                krate: name.to_owned(),
                source_desc,
                via: via.clone(),
                reason,
                runs_at_build: build_time_code(pkg),
            };
            match pkg["source"].as_str() {
                None => {
                    let dir = pkg["manifest_path"]
                        .as_str()
                        .and_then(|m| Path::new(m).parent())
                        .unwrap_or(Path::new(""));
                    if dir == function_dir {
                        if let Some(code) = build_time_code(pkg) {
                            return Err(if code.starts_with("a proc-macro") {
                                Refusal::ProcMacro { krate: name.to_owned() }
                            } else {
                                Refusal::BuildScript {
                                    krate: name.to_owned(),
                                    script: "build.rs".to_owned(),
                                }
                            });
                        }
                    } else if dir != sdk_dir {
                        return Err(refuse(format!("path {}", dir.display()), DependencyReason::NotCratesIo));
                    }
                    checked.local_dirs.insert(dir.to_owned());
                }
                Some(source) if is_crates_io(source) => {
                    check_allowed(name, version).map_err(|r| refuse(format!("crates.io {version}"), r))?;
                    checked.registry_packages.insert(format!("{name} {version}"));
                }
                Some(source) => return Err(refuse(source.to_owned(), DependencyReason::NotCratesIo)),
            }
            stack.push((dep_id, via));
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SDK: &str = "/src/sdk";
    const CRATES_IO: &str = "registry+https://github.com/rust-lang/crates.io-index";

    fn canonical(p: &Path) -> Option<PathBuf> {
        Some(p.to_owned())
    }

    fn function_meta(targets: Value, deps: Value) -> Value {
        json!({
            "packages": [{
                "name": "f", "id": "path+file:///fn#f@0.1.0", "manifest_path": "/fn/Cargo.toml",
                "targets": targets, "dependencies": deps,
            }],
            "workspace_root": "/fn",
        })
    }

    fn lib() -> Value {
        json!([{"kind": ["lib"], "name": "f", "src_path": "/fn/src/lib.rs"}])
    }

    fn check(meta: &Value) -> Result<Result<FunctionCrate, Refusal>, NotAFunction> {
        check_function(meta, Path::new("/fn/Cargo.toml"), Path::new(SDK), &canonical)
    }

    #[test]
    fn allowlist_checks_name_and_version_range() {
        assert_eq!(check_allowed("sha2", "0.10.9"), Ok(()));
        assert_eq!(
            check_allowed("sha2", "0.11.0"),
            Err(DependencyReason::VersionOutOfRange {
                allowed: ">=0.10, <0.11"
            })
        );
        assert!(
            check_allowed("sha2", "0.10.9-rc.1").is_err(),
            "pre-releases are outside"
        );
        assert_eq!(check_allowed("libc", "0.2.1"), Err(DependencyReason::NotAllowlisted));
        for c in ALLOWED_CRATES {
            assert!(
                semver::VersionReq::parse(c.versions).is_ok(),
                "{}: {}",
                c.name,
                c.versions
            );
        }
    }

    #[test]
    fn a_normal_function_passes() {
        let meta = function_meta(
            lib(),
            json!([
                {"name": "microfaas-sdk", "source": null, "path": SDK, "kind": null, "registry": null},
                {"name": "sha2", "source": CRATES_IO, "kind": null, "registry": null},
                {"name": "anything", "source": null, "path": "/x", "kind": "dev", "registry": null},
            ]),
        );
        let ok = check(&meta).unwrap().unwrap();
        assert_eq!(ok.name, "f");
    }

    #[test]
    fn build_scripts_and_proc_macros_of_the_function_are_refused() {
        let script = json!([{"kind": ["lib"], "name": "f"}, {"kind": ["custom-build"], "name": "build-script-build", "src_path": "/fn/build.rs"}]);
        assert_eq!(
            check(&function_meta(script, json!([]))).unwrap(),
            Err(Refusal::BuildScript {
                krate: "f".into(),
                script: "/fn/build.rs".into()
            })
        );
        let pm = json!([{"kind": ["proc-macro"], "name": "f"}]);
        assert_eq!(
            check(&function_meta(pm, json!([]))).unwrap(),
            Err(Refusal::ProcMacro { krate: "f".into() })
        );
        let none = json!([{"kind": ["bin"], "name": "f"}]);
        assert!(check(&function_meta(none, json!([]))).is_err());
    }

    #[test]
    fn declared_dependencies_are_checked_by_source_not_name() {
        let cases = [
            (
                json!({"name": "cfg-if", "source": null, "path": "/fn/cfg-if", "kind": null, "registry": null}),
                "path /fn/cfg-if",
                DependencyReason::NotCratesIo,
            ),
            (
                json!({"name": "cfg-if", "source": "git+file:///tmp/repo", "kind": null, "registry": null}),
                "git+file:///tmp/repo",
                DependencyReason::NotCratesIo,
            ),
            (
                json!({"name": "cfg-if", "source": "registry+https://evil.example/index", "kind": "build", "registry": "https://evil.example/index"}),
                "registry+https://evil.example/index",
                DependencyReason::NotCratesIo,
            ),
            (
                json!({"name": "libc", "source": CRATES_IO, "kind": null, "registry": null}),
                "crates.io",
                DependencyReason::NotAllowlisted,
            ),
            (
                // A rename does not change what is checked: the package.
                json!({"name": "libc", "rename": "cfg-if", "source": CRATES_IO, "kind": null, "registry": null}),
                "crates.io",
                DependencyReason::NotAllowlisted,
            ),
            (
                // A second SDK copy elsewhere is not the SDK.
                json!({"name": "microfaas-sdk", "source": null, "path": "/elsewhere/sdk", "kind": null, "registry": null}),
                "path /elsewhere/sdk",
                DependencyReason::NotCratesIo,
            ),
        ];
        for (dep, source, reason) in cases {
            let meta = function_meta(lib(), json!([dep]));
            match check(&meta).unwrap() {
                Err(Refusal::Dependency {
                    krate,
                    source_desc,
                    via,
                    reason: got,
                    ..
                }) => {
                    assert_eq!(source_desc, source);
                    assert_eq!(got, reason);
                    assert_eq!(via, format!("f -> {krate}"));
                }
                other => panic!("{dep}: {other:?}"),
            }
        }
    }

    fn graph(extra_pkgs: Value, f_deps: Value) -> Value {
        let mut packages = vec![
            json!({"name": "w", "id": "w", "version": "0.0.0", "source": null, "manifest_path": "/cache/w/Cargo.toml", "targets": []}),
            json!({"name": "f", "id": "f", "version": "0.1.0", "source": null, "manifest_path": "/fn/Cargo.toml", "targets": [{"kind": ["lib"]}]}),
            json!({"name": "microfaas-sdk", "id": "sdk", "version": "0.1.0", "source": null, "manifest_path": "/src/sdk/Cargo.toml", "targets": [{"kind": ["lib"]}]}),
        ];
        packages.extend(extra_pkgs.as_array().unwrap().iter().cloned());
        json!({
            "packages": packages,
            "resolve": {"nodes": [
                {"id": "w", "deps": [{"pkg": "f", "dep_kinds": [{"kind": null}]}, {"pkg": "sdk", "dep_kinds": [{"kind": null}]}]},
                {"id": "f", "deps": f_deps},
                {"id": "sdk", "deps": []},
                {"id": "x", "deps": []},
            ]},
        })
    }

    fn check_g(meta: &Value) -> Result<CheckedGraph, Refusal> {
        check_graph(meta, Path::new("/cache/w/Cargo.toml"), Path::new("/fn"), Path::new(SDK))
    }

    #[test]
    fn the_resolved_graph_is_checked_by_source_name_and_version() {
        let edge = json!([{"pkg": "x", "dep_kinds": [{"kind": null}]}]);
        let pkg = |source: Value, name: &str, version: &str, kind: &str| json!([{"name": name, "id": "x", "version": version, "source": source, "manifest_path": "/elsewhere/x/Cargo.toml", "targets": [{"kind": [kind]}]}]);
        let ok = check_g(&graph(pkg(json!(CRATES_IO), "sha2", "0.10.9", "lib"), edge.clone())).unwrap();
        assert!(ok.registry_packages.contains("sha2 0.10.9"));
        assert!(ok.local_dirs.contains(Path::new("/fn")) && ok.local_dirs.contains(Path::new(SDK)));

        let refused = |meta: Value| match check_g(&meta) {
            Err(Refusal::Dependency {
                reason,
                runs_at_build,
                via,
                ..
            }) => (reason, runs_at_build, via),
            other => panic!("{other:?}"),
        };
        let (reason, code, via) = refused(graph(pkg(Value::Null, "cfg-if", "1.0.0", "proc-macro"), edge.clone()));
        assert_eq!(reason, DependencyReason::NotCratesIo);
        assert!(code.unwrap().contains("proc-macro"));
        assert_eq!(via, "f -> cfg-if");
        let (reason, ..) = refused(graph(
            pkg(json!("git+file:///r#abc"), "cfg-if", "1.0.0", "lib"),
            edge.clone(),
        ));
        assert_eq!(reason, DependencyReason::NotCratesIo);
        let (reason, ..) = refused(graph(pkg(json!(CRATES_IO), "sha2", "0.9.0", "lib"), edge.clone()));
        assert!(matches!(reason, DependencyReason::VersionOutOfRange { .. }));
        let (reason, code, _) = refused(graph(
            pkg(json!(CRATES_IO), "serde_derive", "1.0.0", "proc-macro"),
            edge.clone(),
        ));
        assert_eq!(reason, DependencyReason::NotAllowlisted);
        assert!(code.is_some());
        // Dev-only edges are not compiled.
        let dev = json!([{"pkg": "x", "dep_kinds": [{"kind": "dev"}]}]);
        assert!(check_g(&graph(pkg(Value::Null, "evil", "1.0.0", "lib"), dev)).is_ok());
    }

    #[test]
    fn a_function_with_a_build_script_is_refused_in_the_graph_too() {
        let mut meta = graph(json!([]), json!([]));
        meta["packages"][1]["targets"] = json!([{"kind": ["lib"]}, {"kind": ["custom-build"]}]);
        assert!(matches!(check_g(&meta), Err(Refusal::BuildScript { .. })));
    }

    #[test]
    fn refusals_name_what_they_refuse() {
        let r = Refusal::Dependency {
            krate: "cfg-if".into(),
            source_desc: "path /fn/cfg-if".into(),
            via: "f -> cfg-if".into(),
            reason: DependencyReason::NotCratesIo,
            runs_at_build: Some("a proc-macro, which would run inside the compiler"),
        };
        let text = r.to_string();
        assert!(
            text.starts_with("dependency `cfg-if` (path /fn/cfg-if, via f -> cfg-if) is refused"),
            "{text}"
        );
        assert!(text.contains("proc-macro"), "{text}");
    }
}
