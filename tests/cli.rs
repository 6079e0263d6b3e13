//! The binary's flags as a user types them: each concept spelled one way across subcommands,
//! earlier spellings still accepted, and the agent's `--print-table` listing the same rules as
//! `plan`, through the same ipvsadm formatter.

use std::path::PathBuf;
use std::process::Command;

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/demo-cluster")
}

/// stdout of a successful run.
fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_portpolicy"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn plan_takes_the_proxy_mode_as_the_agent_does_and_the_old_switch_too() {
    let demo = demo();
    let demo = demo.to_str().unwrap();
    let now = "--now=2026-11-26T12:00:00Z";
    let mode = run(&["plan", "-f", demo, now, "--mode", "delegated", "-o", "json"]);
    let switch = run(&["plan", "-f", demo, now, "--delegated", "-o", "json"]);
    assert_eq!(mode, switch);
    let replacement = run(&["plan", "-f", demo, now, "-o", "json"]);
    assert_ne!(mode, replacement, "delegated plans fewer virtual servers");
    assert_eq!(
        replacement,
        run(&["plan", "-f", demo, now, "--mode=replacement", "-o", "json"])
    );
}

/// Virtual-server blocks of an ipvsadm listing: each virtual server's line and its real
/// servers' lines, trailing blanks dropped.
fn blocks(listing: &str) -> Vec<Vec<String>> {
    let mut blocks: Vec<Vec<String>> = Vec::new();
    for line in listing.lines().skip(2) {
        let line = line.trim_end().to_string();
        if line.starts_with("  -> ") {
            blocks
                .last_mut()
                .expect("a real server under a virtual server")
                .push(line);
        } else {
            blocks.push(vec![line]);
        }
    }
    blocks
}

#[test]
fn agent_print_table_lists_the_cluster_ips_plan_lists() {
    let demo = demo();
    let demo = demo.to_str().unwrap();
    let agent = run(&[
        "agent",
        "--node-name=node-a",
        "--mode=replacement",
        "--snapshot",
        demo,
        "--print-table",
    ]);
    assert!(agent.starts_with("Prot LocalAddress:Port Scheduler Flags\n"));
    let plan = run(&["plan", "-f", demo, "--node=node-a", "--now=2026-11-26T12:00:00Z"]);
    let section = plan
        .split("IPVS ON NODE node-a\n")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("plan lists node-a's rules");
    // plan shows the cluster once the operator has written its allocations, so node ports may
    // differ; cluster IPs are the same either way. plan notes each virtual server's Service.
    let cluster_ips: Vec<Vec<String>> = blocks(section)
        .into_iter()
        .filter(|block| block[0].contains(" ClusterIP"))
        .map(|mut block| {
            block[0] = block[0].split(" # ").next().unwrap().trim_end().to_string();
            block
        })
        .collect();
    assert!(cluster_ips.len() >= 4, "{section}");
    let agent_blocks = blocks(&agent);
    for block in &cluster_ips {
        assert!(agent_blocks.contains(block), "{block:?} not in\n{agent}");
    }
}
