//! The function catalog line: how the dispatcher tells a worker about one
//! function (in a `LOAD` request's input and on a new worker's stdin).
//! `func <TAB> preload(0|1) <TAB> warm path <TAB> cold path`.

use std::path::PathBuf;

/// One function as a worker knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Function index.
    pub func: u32,
    /// Load and init it now (warm) rather than only registering it.
    pub preload: bool,
    /// Artifact path for the resident copy.
    pub warm_path: PathBuf,
    /// A private copy of the artifact (another inode), so that a cold start
    /// really loads a fresh image even while the warm copy is resident.
    pub cold_path: PathBuf,
}

impl CatalogEntry {
    /// The line (without a newline). Paths must not contain tabs or newlines
    /// (the dispatcher checks).
    pub fn to_line(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}",
            self.func,
            u8::from(self.preload),
            self.warm_path.display(),
            self.cold_path.display()
        )
    }

    /// Parses a line written by [`CatalogEntry::to_line`].
    pub fn parse(line: &str) -> Option<Self> {
        let mut it = line.split('\t');
        let func = it.next()?.parse().ok()?;
        let preload = match it.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let warm_path = PathBuf::from(it.next().filter(|s| !s.is_empty())?);
        let cold_path = PathBuf::from(it.next().filter(|s| !s.is_empty())?);
        if it.next().is_some() {
            return None;
        }
        Some(Self {
            func,
            preload,
            warm_path,
            cold_path,
        })
    }

    /// Whether `path` can travel in a line.
    pub fn path_ok(path: &std::path::Path) -> bool {
        path.to_str()
            .is_some_and(|s| !s.is_empty() && !s.contains(['\t', '\n']))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let e = CatalogEntry {
            func: 42,
            preload: true,
            warm_path: "/a/b c.so".into(),
            cold_path: "/tmp/x/42.so".into(),
        };
        assert_eq!(CatalogEntry::parse(&e.to_line()), Some(e));
        for bad in [
            "",
            "1\t1\t/a",
            "x\t1\t/a\t/b",
            "1\t2\t/a\t/b",
            "1\t1\t\t/b",
            "1\t1\t/a\t/b\t/c",
        ] {
            assert_eq!(CatalogEntry::parse(bad), None, "{bad:?}");
        }
        assert!(CatalogEntry::path_ok(std::path::Path::new("/x/y.so")));
        assert!(!CatalogEntry::path_ok(std::path::Path::new("/x\ty.so")));
    }
}
