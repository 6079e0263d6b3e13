//! `portpolicy plan` and `agent --snapshot` read cluster snapshots from files, directories and
//! standard input.
//!
//! Parsing is the core's ([`portpolicy_core::snapshot::Loader`]); this module only finds and
//! reads the files, so the core stays free of file-system access. Nothing here fails the whole
//! load: an entry that cannot be read becomes a problem naming it, and the rest is read.
//!
//! In a directory, only `.yaml`, `.yml` and `.json` files are read, in name order, recursively;
//! hidden directories (`.git/`, and the `..data` and `..2026_...` directories of a mounted
//! ConfigMap, whose files are also reached through the symlinks beside them) are skipped; every
//! file is read once however many symlinks lead to it; entries that are not regular files
//! (FIFOs, sockets, devices) are never opened, so none can block the read. A path named on the
//! command line is read whatever it is: `-f <(kubectl get ...)` is a pipe the user asked for.

use std::collections::HashSet;
use std::fs::Metadata;
use std::io::Read;
use std::path::{Path, PathBuf};

use portpolicy_core::snapshot::{Loaded, Loader};

/// The path that stands for standard input, as in `kubectl apply -f -`.
pub const STDIN: &str = "-";

/// Reads files, directories and `-` (standard input) into one snapshot.
pub fn load_paths(paths: &[PathBuf]) -> Loaded {
    let mut walk = Walk {
        loader: Loader::new(),
        files: HashSet::new(),
        directories: HashSet::new(),
    };
    for path in paths {
        if path.as_os_str() == STDIN {
            walk.read_stdin();
        } else {
            walk.entry(path, true);
        }
    }
    walk.loader.finish()
}

struct Walk {
    loader: Loader,
    /// Canonical paths of the files and directories already read.
    files: HashSet<PathBuf>,
    directories: HashSet<PathBuf>,
}

fn is_snapshot_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn what_it_is(meta: &Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    let _ = meta;
    "not a regular file"
}

impl Walk {
    fn read_stdin(&mut self) {
        let mut bytes = Vec::new();
        match std::io::stdin().lock().read_to_end(&mut bytes) {
            Ok(_) => self.loader.add_bytes("<stdin>", &bytes),
            Err(e) => self
                .loader
                .unreadable("<stdin>", format!("cannot read standard input: {e}")),
        }
    }

    /// One path: `explicit` when the user named it, not found in a directory.
    /// Returns how many snapshot files it held.
    fn entry(&mut self, path: &Path, explicit: bool) -> usize {
        let name = path.display().to_string();
        let link = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) => {
                self.loader.unreadable(&name, format!("cannot read: {e}"));
                return 0;
            }
        };
        let meta = if link.file_type().is_symlink() {
            match std::fs::metadata(path) {
                Ok(meta) => meta,
                Err(e) => {
                    if explicit || is_snapshot_file(path) {
                        let target = std::fs::read_link(path)
                            .map(|t| t.display().to_string())
                            .unwrap_or_else(|_| "?".into());
                        self.loader
                            .unreadable(&name, format!("a symlink to {target}, which cannot be read: {e}"));
                    }
                    return 0;
                }
            }
        } else {
            link
        };
        if meta.is_dir() {
            if !explicit && is_hidden(path) {
                return 0;
            }
            return self.directory(path, &name);
        }
        if !explicit && !is_snapshot_file(path) {
            return 0;
        }
        if !meta.is_file() && !explicit {
            self.loader.problem(
                &name,
                format!("{}, not a regular file: not opened", what_it_is(&meta)),
            );
            return 0;
        }
        if let Ok(canonical) = std::fs::canonicalize(path)
            && !self.files.insert(canonical)
        {
            // The same file through another symlink (a mounted ConfigMap's layout): read once.
            return 1;
        }
        match std::fs::read(path) {
            Ok(bytes) => self.loader.add_bytes(&name, &bytes),
            Err(e) => self.loader.unreadable(&name, format!("cannot read: {e}")),
        }
        1
    }

    fn directory(&mut self, path: &Path, name: &str) -> usize {
        match std::fs::canonicalize(path) {
            Ok(canonical) => {
                if !self.directories.insert(canonical) {
                    // Reached again through a symlink (or a symlink loop): read once.
                    return 0;
                }
            }
            Err(e) => {
                self.loader.unreadable(name, format!("cannot read: {e}"));
                return 0;
            }
        }
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) => {
                self.loader
                    .unreadable(name, format!("cannot list the directory: {e}"));
                return 0;
            }
        };
        let mut paths = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => paths.push(entry.path()),
                Err(e) => self
                    .loader
                    .unreadable(name, format!("cannot list the directory: {e}")),
            }
        }
        paths.sort();
        let found: usize = paths.iter().map(|p| self.entry(p, false)).sum();
        if found == 0 {
            self.loader.problem(name, "holds no .yaml, .yml or .json files");
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_demo_cluster_loads_without_problems() {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo-cluster"));
        let loaded = load_paths(&[dir]);
        assert_eq!(loaded.problems, []);
        let s = &loaded.snapshot;
        assert_eq!(
            (
                s.nodes.len(),
                s.namespaces.len(),
                s.policies.len(),
                s.daemon_sets.len(),
                s.deployments.len()
            ),
            (3, 4, 1, 1, 1)
        );
        assert_eq!(s.services.len(), 8);
        assert_eq!(s.endpoint_slices.len(), 9);
        assert_eq!(s.pods.len(), 7);
    }
}
