//! `portpolicy plan` and `agent --snapshot` read cluster snapshots from files and directories.
//!
//! Parsing is the core's ([`portpolicy_core::snapshot`]); this module only finds and reads the
//! files, so the core stays free of file-system access.

use std::path::{Path, PathBuf};

use portpolicy_core::snapshot::{Loaded, parse_into};

/// Loading failed as a whole: nothing could be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no YAML files")]
    EmptyDirectory { path: PathBuf },
}

/// Reads files and directories (their `.yaml`, `.yml` and `.json` files, sorted by name).
pub fn load_paths(paths: &[PathBuf]) -> Result<Loaded, LoadError> {
    let mut loaded = Loaded::default();
    for path in paths {
        for file in files_under(path)? {
            let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Read {
                path: file.clone(),
                source,
            })?;
            parse_into(&file.display().to_string(), &text, &mut loaded);
        }
    }
    Ok(loaded)
}

fn files_under(path: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    if !path.metadata().map_err(read_err)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let p = entry.path();
        if p.is_dir() {
            files.extend(files_under(&p)?);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(LoadError::EmptyDirectory {
            path: path.to_path_buf(),
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_demo_cluster_loads_without_problems() {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo-cluster"));
        let loaded = load_paths(&[dir]).unwrap();
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
