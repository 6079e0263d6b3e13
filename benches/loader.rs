//! The snapshot loader on a real-sized dump, against libyaml.
//!
//! Generates `kubectl get ... -A -o yaml` (and `-o json`) of a 10,000-Service, 100,000-endpoint,
//! 50,000-Pod cluster (`portpolicy-cluster-dump`, in `crates/cluster-dump`), writes it to a temporary file and prints:
//!
//! - `load`: `snapshot_files::load_paths` on the file, what `plan` and `agent --snapshot` run:
//!   the wall time (median of `--runs`), MB/s, and the heap peak (a counting allocator) and what
//!   stays live afterwards;
//! - `load + plan one node`: the same followed by `build_plan` for one node, what
//!   `portpolicy plan --node NAME` does;
//! - the same load of the JSON dump;
//! - `PyYAML CLoader`: Python's libyaml-backed loader merely parsing the same YAML file, the
//!   speed target (checks `yaml.__with_libyaml__`; installs PyYAML with pip when it is missing).
//!
//! `cargo bench --bench loader` runs the full size; without `--bench` (as `cargo test
//! --all-targets` runs it) a cluster 100x smaller, once, as a smoke test. `--scale N` divides
//! the cluster by N; `--write-dump DIR` only writes `cluster.yaml` and `cluster.json` there (to
//! try `portpolicy plan` on them) and exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use portpolicy::snapshot_files::load_paths;
use portpolicy_cluster_dump::{self as cluster_dump, DumpShape};
use portpolicy_core::ipvs::{NodePortAddresses, ProxyMode};
use portpolicy_core::plan::{PlanOptions, build_plan};
use portpolicy_core::ports::PortRange;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{LIVE, PEAK, reset_peak};

const MIB: f64 = 1024.0 * 1024.0;

struct Measured {
    median: Duration,
    peak: usize,
    retained: usize,
}

/// Runs `work` `runs` times; the heap figures are from the first run.
fn measure<T>(runs: usize, mut work: impl FnMut() -> T) -> Measured {
    let mut times = Vec::new();
    let (mut peak, mut retained) = (0, 0);
    for run in 0..runs {
        let before = LIVE.load(Ordering::Relaxed);
        reset_peak();
        let start = Instant::now();
        let kept = work();
        times.push(start.elapsed());
        if run == 0 {
            peak = PEAK.load(Ordering::Relaxed) - before;
            retained = LIVE.load(Ordering::Relaxed).saturating_sub(before);
        }
        drop(kept);
    }
    times.sort();
    Measured {
        median: times[times.len() / 2],
        peak,
        retained,
    }
}

fn report(what: &str, bytes: usize, m: &Measured) {
    println!(
        "{what:<28} {:>8.2} s  {:>6.1} MB/s  heap peak {:>7.0} MiB  retained {:>7.0} MiB",
        m.median.as_secs_f64(),
        bytes as f64 / 1e6 / m.median.as_secs_f64(),
        m.peak as f64 / MIB,
        m.retained as f64 / MIB,
    );
}

/// PyYAML's libyaml-backed figures on `file`: the median seconds of `yaml.load` with the
/// CLoader (into Python objects), and of merely iterating libyaml's parse events. Python's
/// cycle collector is off for both: left on, it rescans the growing object graph and makes
/// `load` several times slower (measured: 637 s instead of about a tenth of that at full size),
/// which would flatter the comparison.
fn libyaml_seconds(file: &Path, runs: usize) -> Result<(f64, f64), String> {
    let check = "import yaml; assert yaml.__with_libyaml__, 'PyYAML was built without libyaml'";
    let has_pyyaml = |py: &str| {
        Command::new("python3")
            .args(["-c", py])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_pyyaml(check) {
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "pyyaml"])
            .status();
        if !has_pyyaml(check) {
            return Err("PyYAML with libyaml is not available (pip install pyyaml)".into());
        }
    }
    let script = format!(
        "import gc, sys, time, yaml\n\
         gc.disable()\n\
         def median(work):\n\
         \x20   times = []\n\
         \x20   for _ in range({runs}):\n\
         \x20       with open(sys.argv[1], 'rb') as f:\n\
         \x20           start = time.perf_counter()\n\
         \x20           work(f)\n\
         \x20           times.append(time.perf_counter() - start)\n\
         \x20   return sorted(times)[len(times) // 2]\n\
         load = median(lambda f: yaml.load(f, Loader=yaml.CLoader))\n\
         events = median(lambda f: sum(1 for _ in yaml.parse(f, Loader=yaml.CLoader)))\n\
         print(load, events)\n"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .arg(file)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut numbers = text.split_whitespace().map(str::parse::<f64>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(load)), Some(Ok(events))) => Ok((load, events)),
        _ => Err(format!("unexpected output from Python: {text}")),
    }
}

fn flag(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let runs = flag("--runs")
        .and_then(|n| n.parse().ok())
        .unwrap_or(if full { 3 } else { 1 });
    let scale = flag("--scale")
        .and_then(|n| n.parse().ok())
        .unwrap_or(if full { 1 } else { 100 });
    let shape = DumpShape::LARGE.scaled_down(scale);
    let write_only = flag("--write-dump").map(PathBuf::from);
    let dir = write_only.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("portpolicy-loader-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).unwrap();
    let yaml_file: PathBuf = dir.join("cluster.yaml");
    let json_file: PathBuf = dir.join("cluster.json");
    let yaml = cluster_dump::yaml(shape);
    std::fs::write(&yaml_file, &yaml).unwrap();
    let json = cluster_dump::json(shape);
    std::fs::write(&json_file, &json).unwrap();
    println!(
        "cluster: {} Services, {} endpoints, {} Pods, {} Nodes ({} objects); YAML {:.1} MB, JSON {:.1} MB; {runs} run(s) each",
        shape.services,
        shape.endpoints(),
        shape.pods,
        shape.nodes,
        shape.objects(),
        yaml.len() as f64 / 1e6,
        json.len() as f64 / 1e6,
    );
    let (yaml_bytes, json_bytes) = (yaml.len(), json.len());
    drop((yaml, json));
    if write_only.is_some() {
        println!("wrote {} and {}", yaml_file.display(), json_file.display());
        return;
    }

    let load = measure(runs, || {
        let loaded = load_paths(std::slice::from_ref(&yaml_file));
        assert_eq!(
            loaded.snapshot.object_count(),
            shape.objects(),
            "{:?}",
            loaded.problems.first()
        );
        loaded
    });
    report("load (YAML)", yaml_bytes, &load);

    let options = PlanOptions {
        node_port_range: PortRange::DEFAULT_NODE_PORTS,
        mode: ProxyMode::Replacement,
        node: Some("node-000".into()),
        node_port_addresses: NodePortAddresses::All,
        now: "2026-11-26T12:00:00Z".parse().unwrap(),
    };
    let plan = measure(runs, || {
        let loaded = load_paths(std::slice::from_ref(&yaml_file));
        let report = build_plan(&loaded.snapshot, &options);
        assert_eq!(report.nodes.len(), 1);
        report
    });
    report("load + plan one node (YAML)", yaml_bytes, &plan);

    let load_json = measure(runs, || {
        let loaded = load_paths(std::slice::from_ref(&json_file));
        assert_eq!(loaded.snapshot.object_count(), shape.objects());
        loaded
    });
    report("load (JSON)", json_bytes, &load_json);
    println!(
        "JSON load takes {:.2}x the time of YAML load; YAML heap peak is {:.2}x the file, {:.2}x what is kept",
        load_json.median.as_secs_f64() / load.median.as_secs_f64(),
        load.peak as f64 / yaml_bytes as f64,
        load.peak as f64 / load.retained.max(1) as f64,
    );

    match libyaml_seconds(&yaml_file, runs) {
        Ok((load_seconds, event_seconds)) => {
            for (what, seconds) in [
                ("PyYAML CLoader load", load_seconds),
                ("libyaml parse events only", event_seconds),
            ] {
                println!(
                    "{what:<28} {seconds:>8.2} s  {:>6.1} MB/s",
                    yaml_bytes as f64 / 1e6 / seconds
                );
            }
            println!(
                "our YAML load takes {:.2}x the time of CLoader's load, {:.2}x that of libyaml's bare parse",
                load.median.as_secs_f64() / load_seconds,
                load.median.as_secs_f64() / event_seconds
            );
        }
        Err(why) => println!("PyYAML CLoader: not measured: {why}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
