//! `microfaas snapshots {tree,show,diff,verify,gc}`: lineage inspection of
//! the snapshot store, as text or (`--json`) one JSON document on stdout.

use clap::{Args, Subcommand};
use serde::Serialize;
use snapshots::{Store, TreeNode};
use std::path::PathBuf;
use std::time::Duration;

/// Inspect the vm backend's snapshot store.
#[derive(Debug, Args)]
pub struct SnapshotsCommand {
    /// The store directory (default: $MICROFAAS_STORE, else
    /// ~/.cache/microfaas/snapshots).
    #[arg(long, global = true)]
    store: Option<PathBuf>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: SnapshotsAction,
}

/// What to do with the store.
#[derive(Debug, Subcommand)]
pub enum SnapshotsAction {
    /// The lineage tree: id, level, label, own pages, bytes on disk, created, last used.
    Tree,
    /// One node: own / inherited pages, pages shared with siblings, vCPU state summary, files.
    Show {
        /// A node id or a unique prefix of one.
        id: String,
    },
    /// The pages in which two nodes' memory differs, as guest-physical ranges.
    Diff {
        /// The first node (id or unique prefix).
        a: String,
        /// The second node (id or unique prefix).
        b: String,
    },
    /// Check every checksum and MAC in the store, and every cached merged
    /// image against its lineage; exit 1 if any file is bad.
    Verify,
    /// Remove the given subtrees, or (no ids) orphaned, broken and superseded
    /// nodes and stale image caches.
    Gc {
        /// Never remove base or function nodes, only argument nodes.
        #[arg(long)]
        keep_functions: bool,
        /// Also remove nodes not used for this many seconds (no ids given).
        #[arg(long, value_name = "SECS")]
        unused_for: Option<u64>,
        /// Show what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Nodes whose subtrees to remove (ids or unique prefixes).
        ids: Vec<String>,
    },
}

/// A failed snapshots command: exit code and the message to print.
#[derive(Debug)]
pub struct CliError {
    /// Process exit code.
    pub code: u8,
    /// The error with its causes.
    pub message: String,
}

fn fail(err: &dyn std::error::Error) -> CliError {
    CliError {
        code: 1,
        message: crate::chain(err),
    }
}

fn print_json(value: &impl Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| fail(&e))?;
    outln!("{text}");
    Ok(())
}

/// Runs one snapshots command.
pub fn run(cmd: SnapshotsCommand) -> Result<(), CliError> {
    let dir = cmd.store.unwrap_or_else(snapshots::default_store_dir);
    let store = Store::open(&dir).map_err(|e| fail(&e))?;
    let resolve = |text: &str| store.resolve(text).map_err(|e| fail(&e));
    match cmd.action {
        SnapshotsAction::Tree => {
            let report = snapshots::tree(&store).map_err(|e| fail(&e))?;
            if cmd.json {
                return print_json(&report);
            }
            outln!("store {}", report.store.display());
            outln!(
                "{:<20} {:<9} {:<34} {:>9} {:>10} {:<20} LAST USED",
                "ID",
                "LEVEL",
                "LABEL",
                "OWN PAGES",
                "ON DISK",
                "CREATED"
            );
            /// `branch`: this node's connector; `below`: what its
            /// children's lines start with.
            fn print(n: &TreeNode, branch: &str, below: &str) {
                let id = format!("{branch}{}", n.id.short());
                outln!(
                    "{id:<20} {:<9} {:<34} {:>9} {:>10} {:<20} {}",
                    n.level.to_string(),
                    escaped(&n.label.to_string()),
                    n.own_pages,
                    human_bytes(n.bytes_on_disk),
                    utc(n.created_unix_ms),
                    utc(n.last_used_unix_ms)
                );
                if let Some(p) = &n.problem {
                    outln!("{below}  ! {}", escaped(p));
                }
                for (i, c) in n.children.iter().enumerate() {
                    let last = i + 1 == n.children.len();
                    let (connector, continuation) = if last { ("└ ", "  ") } else { ("├ ", "│ ") };
                    print(c, &format!("{below}{connector}"), &format!("{below}{continuation}"));
                }
            }
            for r in &report.roots {
                print(r, "", "");
            }
            if report.roots.is_empty() {
                outln!("(no snapshot nodes)");
            }
            for b in &report.broken {
                outln!(
                    "BROKEN {}: {}",
                    escaped(&b.path.display().to_string()),
                    escaped(&b.error)
                );
            }
            Ok(())
        }
        SnapshotsAction::Show { id } => {
            let report = snapshots::show(&store, resolve(&id)?).map_err(|e| fail(&e))?;
            if cmd.json {
                return print_json(&report);
            }
            outln!("node        {}", report.id);
            outln!("level       {}", report.level);
            outln!("label       {}", escaped(&report.label.to_string()));
            let parent = report.parent.map_or("-".to_owned(), |p| p.to_string());
            outln!("parent      {parent}");
            let lineage: Vec<String> = report.lineage.iter().map(|i| i.short()).collect();
            outln!("lineage     {}", lineage.join(" -> "));
            outln!("children    {}", report.children.len());
            outln!("guest mem   {}", human_bytes(report.guest_mem_bytes));
            outln!(
                "pages       {} own, {} inherited, {} present ({} guest pages)",
                report.own_pages,
                report.inherited_pages,
                report.present_pages,
                report.guest_mem_bytes / snapshots::PAGE_SIZE_U64
            );
            outln!(
                "on disk     {} (lineage {})",
                human_bytes(report.bytes_on_disk),
                human_bytes(report.lineage_bytes_on_disk)
            );
            outln!("created     {}", utc(report.created_unix_ms));
            outln!("last used   {}", utc(report.last_used_unix_ms));
            outln!("state       {} bytes", report.state_bytes);
            for (k, v) in &report.state_summary {
                outln!("  {:<10} {}", escaped(k), escaped(v));
            }
            outln!("siblings    {}", report.siblings.len());
            for s in &report.siblings {
                outln!(
                    "  {} {:<30} {} pages shared, {} identical own pages",
                    s.id.short(),
                    escaped(&s.label.to_string()),
                    s.shared_pages,
                    s.identical_own_pages
                );
            }
            outln!("own ranges  {}", report.own_ranges.len());
            for r in report.own_ranges.iter().take(16) {
                outln!("  {r}");
            }
            if report.own_ranges.len() > 16 {
                outln!("  ... {} more (--json lists all)", report.own_ranges.len() - 16);
            }
            outln!("files");
            for p in &report.files.lineage {
                outln!("  node   {}", p.display());
            }
            match (&report.files.image, &report.image) {
                (Some(p), Some(meta)) => outln!(
                    "  image  {} ({} non-zero pages, built in {:.1} ms)",
                    p.display(),
                    snapshots::total_pages(&meta.nonzero),
                    us_to_ms(meta.build_us)
                ),
                _ => outln!("  image  (not built)"),
            }
            Ok(())
        }
        SnapshotsAction::Diff { a, b } => {
            let report = snapshots::diff(&store, resolve(&a)?, resolve(&b)?).map_err(|e| fail(&e))?;
            if cmd.json {
                return print_json(&report);
            }
            let common = report.common_ancestor.map_or("none".to_owned(), |c| c.short());
            outln!(
                "{} vs {}: {} pages differ in {} ranges (common ancestor {common})",
                report.a.short(),
                report.b.short(),
                report.differing_pages,
                report.ranges.len()
            );
            for r in &report.ranges {
                outln!("  {:#012x}-{:#012x}  {} pages", r.start_gpa, r.end_gpa, r.pages);
            }
            Ok(())
        }
        SnapshotsAction::Verify => {
            let report = snapshots::verify(&store).map_err(|e| fail(&e))?;
            if cmd.json {
                print_json(&report)?;
            } else {
                for b in &report.bad {
                    outln!("BAD {}: {}", escaped(&b.path.display().to_string()), escaped(&b.error));
                }
                for s in &report.stale_images {
                    outln!("stale image cache (rebuilt on use): {}", s.display());
                }
                outln!(
                    "checked {} node files (checksums and keyed MAC) and {} merged images: {}",
                    report.nodes_checked,
                    report.images_checked,
                    if report.ok() {
                        "ok".to_owned()
                    } else {
                        format!("{} problems", report.bad.len())
                    }
                );
            }
            if report.ok() {
                Ok(())
            } else {
                Err(CliError {
                    code: 1,
                    message: format!("{} bad snapshot files in {}", report.bad.len(), dir.display()),
                })
            }
        }
        SnapshotsAction::Gc {
            keep_functions,
            unused_for,
            dry_run,
            ids,
        } => {
            let roots = ids.iter().map(|i| resolve(i)).collect::<Result<Vec<_>, _>>()?;
            let opts = snapshots::GcOptions {
                roots,
                keep_functions,
                unused_for: unused_for.map(Duration::from_secs),
                dry_run,
            };
            let report = snapshots::gc(&store, &opts).map_err(|e| fail(&e))?;
            if cmd.json {
                return print_json(&report);
            }
            let verb = if dry_run { "would remove" } else { "removed" };
            for n in &report.removed {
                outln!(
                    "{verb} {} {:<9} {:<30} ({})",
                    n.id.short(),
                    n.level.to_string(),
                    escaped(&n.label.to_string()),
                    n.reason
                );
            }
            for f in &report.removed_files {
                outln!("{verb} {}", f.display());
            }
            outln!(
                "{verb} {} nodes and {} other files, {} freed",
                report.removed.len(),
                report.removed_files.len(),
                human_bytes(report.bytes_freed)
            );
            Ok(())
        }
    }
}

#[allow(clippy::cast_precision_loss)]
/// `text` with control characters escaped (`\n`, `\u{1b}`, ...): labels
/// and state summaries come from node files, and must not move the cursor,
/// recolour or clear the terminal that prints them.
fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Bytes as B / KiB / MiB / GiB with one decimal.
#[allow(clippy::cast_precision_loss)]
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escaped("echo@sha256:ab"), "echo@sha256:ab");
        assert_eq!(escaped("a\x1b[2Jb\nc\t"), "a\\u{1b}[2Jb\\nc\\t");
        assert_eq!(escaped("\u{9b}x"), "\\u{9b}x");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_890_750_828), "2026-11-28 18:32:30");
    }

    #[test]
    fn byte_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }
}
