//! `portpolicy plan` without `--node` on many nodes: 50 and 500 nodes x 10,000 Services
//! (10 endpoints each; one NodePort Service in ten keeps external traffic on the node).
//!
//! For each size prints the wall time of planning and writing the JSON and the table (what
//! `plan -o json|table` does after loading), the bytes written, and from a counting allocator
//! the heap peak above the loaded snapshot and every byte allocated on the way. The snapshot is
//! built in memory (`Loader::add_value`), so the figures are the planner's and the writer's, not
//! the YAML parser's (that is `benches/loader`). `--compare` also plans every node complete in
//! memory (`build_plan` and `to_json`, version 1's way) at 50 nodes.
//!
//! `cargo bench --bench plan_nodes` runs the full sizes; without `--bench` (as `cargo test
//! --all-targets` runs it) a cluster 100x smaller, as a smoke test.

use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use portpolicy_cluster_dump::{self as cluster_dump, DumpShape};
use portpolicy_core::ipvs::{NodePortAddresses, ProxyMode};
use portpolicy_core::plan::{Plan, PlanFormat, PlanOptions, build_plan};
use portpolicy_core::ports::PortRange;
use portpolicy_core::snapshot::{Loader, Snapshot};
use serde_json::json;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{ALLOCATED, LIVE, PEAK, reset_peak};

const MIB: f64 = 1024.0 * 1024.0;

/// Counts what is written and keeps none of it.
#[derive(Default)]
struct CountingSink(usize);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn snapshot(shape: DumpShape) -> Snapshot {
    let mut loader = Loader::new();
    for (i, mut item) in cluster_dump::items(shape).enumerate() {
        if item["kind"] == "Service"
            && let Some(n) = (item["metadata"]["name"].as_str())
                .and_then(|name| name.strip_prefix("app-")?.parse::<usize>().ok())
            && shape.is_node_port(n)
            && n % 10 == 0
        {
            item["spec"]["externalTrafficPolicy"] = json!("Local");
        }
        loader.add_value(&format!("item {i}"), item);
    }
    let loaded = loader.finish();
    assert_eq!(loaded.problems, []);
    loaded.snapshot
}

struct Measured {
    time: Duration,
    peak: usize,
    allocated: usize,
    written: usize,
}

fn measure(work: impl FnOnce(&mut CountingSink)) -> Measured {
    let before = LIVE.load(Ordering::Relaxed);
    let allocated_before = ALLOCATED.load(Ordering::Relaxed);
    reset_peak();
    let mut sink = CountingSink::default();
    let start = Instant::now();
    work(&mut sink);
    Measured {
        time: start.elapsed(),
        peak: PEAK.load(Ordering::Relaxed) - before,
        allocated: ALLOCATED.load(Ordering::Relaxed) - allocated_before,
        written: sink.0,
    }
}

fn report(what: &str, m: &Measured) {
    println!(
        "{what:<34} {:>8.2} s  {:>8.1} MB written  heap peak {:>7.1} MiB  allocated {:>9.1} MiB",
        m.time.as_secs_f64(),
        m.written as f64 / 1e6,
        m.peak as f64 / MIB,
        m.allocated as f64 / MIB,
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let compare = std::env::args().any(|a| a == "--compare");
    let scale = if full { 1 } else { 100 };
    let options = PlanOptions {
        node_port_range: PortRange::DEFAULT_NODE_PORTS,
        mode: ProxyMode::Replacement,
        node: None,
        node_port_addresses: NodePortAddresses::All,
        now: "2026-11-26T12:00:00Z".parse().unwrap(),
    };
    for nodes in [50, 500] {
        let shape = DumpShape {
            namespaces: 100 / scale,
            nodes: nodes / scale.min(10),
            services: 10_000 / scale,
            endpoints_per_service: 10,
            pods: 10_000 / scale,
        };
        let snapshot = snapshot(shape);
        let live = LIVE.load(Ordering::Relaxed);
        println!(
            "{} nodes x {} Services ({} endpoints); snapshot and generator live: {:.0} MiB",
            shape.nodes,
            shape.services,
            shape.endpoints(),
            live as f64 / MIB
        );
        for (what, format) in [
            ("plan, every node (JSON)", PlanFormat::Json),
            ("plan, every node (table)", PlanFormat::Table),
        ] {
            let m = measure(|sink| {
                let mut out = io::BufWriter::new(sink);
                Plan::new(&snapshot, &options).write(format, &mut out).unwrap();
                out.flush().unwrap();
            });
            report(what, &m);
        }
        let one = measure(|sink| {
            let options = PlanOptions {
                node: Some("node-000".into()),
                ..options.clone()
            };
            Plan::new(&snapshot, &options)
                .write(PlanFormat::Json, sink)
                .unwrap();
        });
        report("plan --node (JSON)", &one);
        if compare && shape.nodes <= 50 {
            let m = measure(|sink| {
                let report = build_plan(&snapshot, &options);
                sink.write_all(report.to_json().as_bytes()).unwrap();
            });
            report("every node complete (version 1)", &m);
        }
    }
}
