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
        if meta.is_file() {
            // Read as it comes in: a dump's memory follows what is kept of it.
            self.loader.add_reader(&name, || std::fs::File::open(path));
        } else {
            // A pipe the user named (`-f <(kubectl ...)`) cannot be opened twice: read whole.
            match std::fs::read(path) {
                Ok(bytes) => self.loader.add_bytes(&name, &bytes),
                Err(e) => self.loader.unreadable(&name, format!("cannot read: {e}")),
            }
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
    use std::os::unix::fs::symlink;
    use std::process::Command;
    use std::time::Duration;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("portpolicy-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn node(name: &str) -> String {
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n")
    }

    fn node_names(loaded: &Loaded) -> Vec<&str> {
        let mut names: Vec<_> = loaded
            .snapshot
            .nodes
            .iter()
            .map(|n| n.metadata.name.as_deref().unwrap_or_default())
            .collect();
        names.sort();
        names
    }

    /// The problems as (entry file name, message), entries named relative to `dir`.
    fn problems_in(loaded: &Loaded, dir: &Path) -> Vec<(String, String)> {
        let prefix = format!("{}/", dir.display());
        loaded
            .problems
            .iter()
            .map(|p| {
                let entry = p.object.strip_prefix(&prefix).unwrap_or(&p.object).to_string();
                (entry, p.message.clone())
            })
            .collect()
    }

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

    #[test]
    fn each_bad_entry_is_a_problem_naming_it_and_the_rest_is_read() {
        let dir = scratch("bad-entries");
        std::fs::write(dir.join("a-good.yaml"), node("good")).unwrap();
        // kubectl output redirected by PowerShell: UTF-16LE with a byte-order mark.
        let mut utf16 = vec![0xFF, 0xFE];
        utf16.extend(node("windows").encode_utf16().flat_map(u16::to_le_bytes));
        std::fs::write(dir.join("b-utf16.yaml"), utf16).unwrap();
        std::fs::write(
            dir.join("c-latin1.yaml"),
            b"apiVersion: v1\nkind: Node\nmetadata: {name: caf\xE9}\n",
        )
        .unwrap();
        symlink(dir.join("missing.yaml"), dir.join("d-dangling.yaml")).unwrap();
        // Unreadable for root too: reading /proc/self/mem at offset 0 fails with EIO.
        symlink("/proc/self/mem", dir.join("e-unreadable.yaml")).unwrap();
        std::fs::create_dir(dir.join("f-empty")).unwrap();
        std::fs::create_dir_all(dir.join(".git/refs")).unwrap();
        std::fs::write(dir.join(".git/config.yaml"), node("from-git")).unwrap();
        std::fs::write(dir.join("README.md"), "not a snapshot").unwrap();
        let fifo = dir.join("g-fifo.yaml");
        assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        std::fs::write(
            dir.join("h-good.json"),
            r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "json"}}"#,
        )
        .unwrap();

        // Opening the FIFO would block until a writer comes: none will.
        let (tx, rx) = std::sync::mpsc::channel();
        let walked = dir.clone();
        std::thread::spawn(move || tx.send(load_paths(&[walked])).unwrap());
        let loaded = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("loading must not hang on a FIFO");

        assert_eq!(node_names(&loaded), ["good", "json", "windows"]);
        let problems = problems_in(&loaded, &dir);
        let entries: Vec<&str> = problems.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(
            entries,
            [
                "c-latin1.yaml",
                "d-dangling.yaml",
                "e-unreadable.yaml",
                "f-empty",
                "g-fifo.yaml"
            ],
            "{problems:#?}"
        );
        let message = |entry: &str| &problems.iter().find(|(e, _)| e == entry).unwrap().1;
        assert!(message("c-latin1.yaml").contains("not UTF-8 text: invalid byte 0xE9"));
        assert!(message("d-dangling.yaml").contains("missing.yaml, which cannot be read"));
        assert!(message("e-unreadable.yaml").starts_with("cannot read"));
        assert!(message("f-empty").contains("holds no .yaml, .yml or .json files"));
        assert!(message("g-fifo.yaml").contains("a FIFO, not a regular file: not opened"));
        // Unreadable text makes the snapshot not whole; the empty directory and FIFO do not.
        let unreadable: Vec<_> = loaded
            .unreadable
            .iter()
            .map(|p| p.object.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(
            unreadable,
            ["c-latin1.yaml", "d-dangling.yaml", "e-unreadable.yaml"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_mounted_config_map_is_read_once() {
        // What the kubelet writes for a ConfigMap volume: the files live in a timestamped
        // directory, `..data` points at it, and each visible name points through `..data`.
        let dir = scratch("configmap");
        let stamped = dir.join("..2026_11_26_12_00_00.000000001");
        std::fs::create_dir(&stamped).unwrap();
        std::fs::write(
            stamped.join("nodes.yaml"),
            format!("{}---\n{}", node("a"), node("b")),
        )
        .unwrap();
        std::fs::write(stamped.join("more.yaml"), node("c")).unwrap();
        symlink("..2026_11_26_12_00_00.000000001", dir.join("..data")).unwrap();
        symlink("..data/nodes.yaml", dir.join("nodes.yaml")).unwrap();
        symlink("..data/more.yaml", dir.join("more.yaml")).unwrap();
        // A second symlink to the same file, and a directory symlink looping back.
        symlink("nodes.yaml", dir.join("alias.yaml")).unwrap();
        symlink(".", dir.join("loop")).unwrap();

        let loaded = load_paths(std::slice::from_ref(&dir));
        assert_eq!(
            loaded.problems,
            [],
            "nothing is read twice, so nothing is a duplicate"
        );
        assert_eq!(node_names(&loaded), ["a", "b", "c"]);
        // Named explicitly, the mounted directory's own files are read too, still once each.
        let loaded = load_paths(&[dir.clone(), dir.join("..data")]);
        assert_eq!(loaded.problems, []);
        assert_eq!(node_names(&loaded), ["a", "b", "c"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_that_is_not_there_is_a_problem_not_a_failure() {
        let dir = scratch("missing");
        std::fs::write(dir.join("ok.yaml"), node("ok")).unwrap();
        let loaded = load_paths(&[dir.join("ok.yaml"), dir.join("nope.yaml")]);
        assert_eq!(node_names(&loaded), ["ok"]);
        assert_eq!(problems_in(&loaded, &dir)[0].0, "nope.yaml");
        assert!(!loaded.is_whole());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
