//! The build's inputs: which files of a crate are compiled (and so hashed
//! and snapshotted), the content hash that keys the artifact cache, and the
//! snapshot the sandbox compiles from.

use crate::build::{BuildError, BuildOptions, RECIPE_VERSION, io_err};
use crate::policy::CheckedGraph;
use crate::sandbox::SANDBOX_VERSION;
use crate::toolchain::Toolchain;
use sha2::{Digest, Sha256};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The function crate's files that are compiled (and hashed): regular files,
/// no symlinks, nothing hidden, no `target`. Relative paths, sorted.
pub(crate) fn snapshot_files(dir: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files).map_err(io_err(format!("reading {}", dir.display())))?;
    files.sort();
    Ok(files)
}

fn hash_tree(h: &mut Sha256, dir: &Path, files: &[PathBuf]) -> Result<(), BuildError> {
    for rel in files {
        h.update(rel.as_os_str().as_bytes());
        h.update([0]);
        let bytes = fs::read(dir.join(rel)).map_err(io_err(format!("reading {}", rel.display())))?;
        h.update(u64::try_from(bytes.len()).unwrap_or(u64::MAX).to_le_bytes());
        h.update(&bytes);
    }
    Ok(())
}

/// Hashes every input that determines the artifact.
pub(crate) fn input_hash(
    toolchain: &Toolchain,
    wrapper: &Path,
    dir: &Path,
    files: &[PathBuf],
    graph: &CheckedGraph,
    workspace_manifests: &[PathBuf],
    opts: &BuildOptions,
) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    h.update(RECIPE_VERSION.as_bytes());
    h.update(SANDBOX_VERSION.as_bytes());
    h.update([u8::from(opts.allow_unsafe), u8::from(opts.sandboxed)]);
    h.update(&toolchain.version);
    let lock = wrapper.join("Cargo.lock");
    h.update(fs::read(&lock).map_err(io_err(format!("reading {}", lock.display())))?);
    for m in workspace_manifests {
        h.update(m.as_os_str().as_bytes());
        h.update(fs::read(m).map_err(io_err(format!("reading {}", m.display())))?);
    }
    h.update(dir.as_os_str().as_bytes());
    hash_tree(&mut h, dir, files)?;
    for local in graph.local_dirs.iter().filter(|d| d.as_path() != dir) {
        h.update(local.as_os_str().as_bytes());
        hash_tree(&mut h, local, &snapshot_files(local)?)?;
    }
    Ok(crate::hex(&h.finalize()))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = entry.metadata()?; // of the entry itself, not a link's target
        if meta.is_dir() {
            collect_files(root, &path, out)?;
        } else if meta.is_file() {
            // A hard link could be a second name of a host file the builder
            // (possibly root) may read and the sandbox may not.
            if meta.nlink() > 1 {
                return Err(io::Error::other(format!(
                    "{} has {} hard links; files with more than one name are refused",
                    path.display(),
                    meta.nlink()
                )));
            }
            out.push(path.strip_prefix(root).unwrap_or(&path).to_owned());
        }
    }
    Ok(())
}

/// Copies `files` of `dir` into a fresh `snapshot`, world-readable (the
/// sandbox's uid reads it; it is what was hashed).
pub(crate) fn write_snapshot(dir: &Path, files: &[PathBuf], snapshot: &Path) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    if snapshot.exists() {
        fs::remove_dir_all(snapshot).map_err(io_err(format!("removing {}", snapshot.display())))?;
    }
    fs::create_dir_all(snapshot).map_err(io_err(format!("creating {}", snapshot.display())))?;
    for rel in files {
        let to = snapshot.join(rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }
        let bytes = fs::read(dir.join(rel)).map_err(io_err(format!("reading {}", rel.display())))?;
        fs::write(&to, bytes).map_err(io_err(format!("writing {}", to.display())))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o644)).map_err(io_err("chmod snapshot file"))?;
    }
    Ok(())
}
