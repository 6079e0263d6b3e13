//! `portpolicy agent`: makes this node's kernel IPVS match the node's plan, changing only what
//! differs.
//!
//! The pieces: a [`source`] (snapshot file or API watches) feeds cluster changes to the
//! [`sync::Syncer`], which keeps the incremental planner and talks to the kernel only through
//! the [`dataplane::Dataplane`] trait ([`linux`] for real, an in-memory fake in tests). Around it: the
//! masquerading ruleset ([`nft`]), sysctls and reserved node ports ([`sysctl`]), health-check
//! node ports ([`health_check`]) and the agent's own `/metrics`, `/healthz`, `/readyz`
//! ([`metrics`]).

pub mod dataplane;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
mod health_check;
mod http;
#[cfg(target_os = "linux")]
mod linux;
pub mod metrics;
pub mod nft;
mod source;
pub mod sync;
pub mod sysctl;
#[cfg(test)]
mod test_support;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::mpsc;

use self::dataplane::Dataplane;
use self::health_check::HealthCheckServers;
use self::metrics::{AgentHealth, Metrics};
use self::nft::{Cidr, MasqueradeOptions};
use self::source::Event;
use self::sync::Syncer;
use crate::flags;
use portpolicy_core::ipvs::listing::format_table;
use portpolicy_core::ipvs::{NodePortAddresses, ProxyConfig, ProxyMode};

/// The agent's port for `/metrics`, `/healthz` and `/readyz`: next to kube-proxy's 10256
/// (healthz) and 10249 (metrics) without taking either, so both can run on one node.
pub(crate) const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:10265";
/// Linux allows 15 bytes in an interface name.
pub(crate) const DEFAULT_INTERFACE: &str = "portpolicy-ipvs";

/// `portpolicy agent` flags; each has an environment variable for DaemonSet manifests.
#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// This node's name (`metadata.name` of its Node; `spec.nodeName` via the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The dummy interface holding cluster, external and load-balancer IPs.
    #[arg(long, env = "PORTPOLICY_INTERFACE", default_value = DEFAULT_INTERFACE)]
    pub interface: String,
    /// Masquerade all traffic to cluster IPs (and Cluster-policy external addresses).
    #[arg(long, env = "PORTPOLICY_MASQUERADE_ALL")]
    pub masquerade_all: bool,
    /// The pod network; traffic to cluster IPs from outside it is masqueraded. Repeatable.
    #[arg(long = "cluster-cidr", env = "PORTPOLICY_CLUSTER_CIDR", value_delimiter = ',')]
    pub cluster_cidrs: Vec<Cidr>,
    /// How often the whole kernel table is compared with the plan (repairs others' changes and
    /// deletes drained real servers), like `60s`, `5m` or `500ms`.
    #[arg(long, env = "PORTPOLICY_RESYNC_PERIOD", default_value = "60s", value_parser = parse_duration)]
    pub resync_period: Duration,
    /// `delegated`: kube-proxy runs too, proxy only Services labeled
    /// `service.kubernetes.io/service-proxy-name: portpolicy`. `replacement`: no kube-proxy,
    /// proxy every Service kube-proxy would and own the whole IPVS table.
    #[arg(long, env = "PORTPOLICY_MODE", value_parser = flags::proxy_mode(), default_value = "delegated")]
    pub mode: ProxyMode,
    /// Run from snapshot files or directories (`kubectl get -o yaml` output) instead of the API
    /// server; they are re-read whenever they change.
    #[arg(long, env = "PORTPOLICY_SNAPSHOT", value_delimiter = ',')]
    pub snapshot: Vec<PathBuf>,
    /// How often snapshot files are checked for changes.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub snapshot_poll: Duration,
    /// Address for `/metrics`, `/healthz` and `/readyz`.
    #[arg(
        long,
        alias = "metrics-addr",
        env = "PORTPOLICY_METRICS_ADDR",
        default_value = DEFAULT_METRICS_ADDRESS
    )]
    pub metrics_address: SocketAddr,
    /// Where the kernel's settings are written: `/proc/sys`, or the host's bind-mounted there
    /// when the container's own `/proc/sys` is read-only.
    #[arg(long, env = "PORTPOLICY_SYSCTL_ROOT", default_value = "/proc/sys")]
    pub sysctl_root: std::path::PathBuf,
    /// Address the health-check node ports listen on.
    #[arg(long, alias = "health-check-bind-address", default_value = "0.0.0.0")]
    pub health_check_address: IpAddr,
    /// With `--snapshot`: print the IPVS table planned for this node (as `ipvsadm -Ln` lists
    /// it) and exit, touching nothing.
    #[arg(long, requires = "snapshot")]
    pub print_table: bool,
    /// Which of the Node's InternalIP and ExternalIP addresses accept node ports: CIDRs
    /// (repeatable, or comma-separated), or `primary` for the node's first address of each
    /// family. Every address when not given. As kube-proxy's `--nodeport-addresses`.
    #[arg(
        long = "nodeport-addresses",
        env = "PORTPOLICY_NODEPORT_ADDRESSES",
        value_delimiter = ','
    )]
    pub nodeport_addresses: Vec<String>,
    /// Set `arp_ignore=1` and `arp_announce=2` on all interfaces, so the node never answers ARP
    /// for the service addresses on the dummy interface (as kube-proxy's `--ipvs-strict-arp`;
    /// MetalLB's L2 mode needs it).
    #[arg(long = "ipvs-strict-arp", env = "PORTPOLICY_IPVS_STRICT_ARP")]
    pub ipvs_strict_arp: bool,
}

impl AgentArgs {
    /// What the nftables ruleset masquerades, from `--masquerade-all` and `--cluster-cidr`.
    pub fn masquerade(&self) -> MasqueradeOptions {
        MasqueradeOptions {
            all: self.masquerade_all,
            cluster_cidrs: self.cluster_cidrs.clone(),
        }
    }
}

/// `90`, `90s`, `500ms`, `5m`, `1h`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 60s, 500ms or 5m"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err("a duration must be above zero".into());
    }
    Ok(d)
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("opening the dataplane: {0}")]
    Dataplane(#[from] dataplane::DataplaneError),
    #[error("listening on {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    SnapshotRefused(String),
    #[error("the agent runs on Linux only")]
    Unsupported,
    #[error("--{flag}: {message}")]
    InvalidFlag { flag: &'static str, message: String },
}

/// Runs the agent on this node until SIGINT or SIGTERM. Rules stay in the kernel on exit, so a
/// restart drops no connection.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    // A bad flag is refused before anything is read or touched.
    let config = proxy_config(&args)?;
    if args.print_table {
        let loaded = crate::snapshot_files::load_paths(&args.snapshot);
        for problem in &loaded.problems {
            tracing::warn!(%problem, "snapshot");
        }
        if let Some(why) = source::refusal(&loaded) {
            return Err(AgentError::SnapshotRefused(why));
        }
        let rules = portpolicy_core::ipvs::node_rules(&loaded.snapshot, &config);
        print!("{}", format_table(&rules.table()));
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        let dataplane =
            linux::LinuxDataplane::open(&args.interface, &args.sysctl_root, args.ipvs_strict_arp)?;
        run_with(args, dataplane).await
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = args;
        Err(AgentError::Unsupported)
    }
}

/// The agent's loop over any dataplane.
pub(crate) async fn run_with<D: Dataplane + 'static>(
    args: AgentArgs,
    dataplane: D,
) -> Result<(), AgentError> {
    let metrics = Metrics::new();
    let health = AgentHealth::new(args.resync_period);
    let listener = tokio::net::TcpListener::bind(args.metrics_address)
        .await
        .map_err(|source| AgentError::Listen {
            address: args.metrics_address,
            source,
        })?;
    let app = metrics::router(metrics.clone(), health.clone());
    tokio::spawn(async move {
        if let Err(e) = http::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(address = %args.metrics_address, "serving /metrics, /healthz and /readyz");

    let (tx, mut rx) = mpsc::channel::<Event>(4096);
    if args.snapshot.is_empty() {
        let client = kube::Client::try_default().await?;
        tokio::spawn(source::kube_source(client, args.node_name.clone(), args.mode, tx));
    } else {
        tokio::spawn(source::snapshot_source(
            args.snapshot.clone(),
            args.snapshot_poll,
            tx,
        ));
    }

    let config = proxy_config(&args)?;
    let masquerade = args.masquerade();
    let mut syncer = Syncer::new(dataplane, config, masquerade, metrics.clone());
    let mut health_checks = HealthCheckServers::new(args.health_check_address, health.clone());

    let mut ready = false;
    let mut dirty = false;
    // When the oldest change not yet in the kernel reached the agent.
    let mut pending_since: Option<Instant> = None;
    let mut next_resync = tokio::time::Instant::now() + args.resync_period;
    let mut backoff = Duration::from_secs(1);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let wake = retry_at.map_or(next_resync, |r| r.min(next_resync));
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("stopping; IPVS rules, addresses and nftables stay in place");
                return Ok(());
            }
            event = rx.recv() => match event {
                None => {
                    tracing::error!("cluster source stopped");
                    return Ok(());
                }
                Some(event) => {
                    // Take everything already queued, so a burst of events is one sync.
                    let mut next = Some(event);
                    while let Some(event) = next {
                        match event {
                            Event::Ready => ready = true,
                            Event::Refused(why) => {
                                metrics.snapshot_refusals.inc();
                                metrics.snapshot_refused.set(1);
                                health.set_source_refused(Some(why));
                            }
                            Event::Change(change, seen) => {
                                pending_since = Some(pending_since.map_or(seen, |p| p.min(seen)));
                                if matches!(change, sync::Change::Snapshot(_)) {
                                    metrics.snapshot_refused.set(0);
                                    health.set_source_refused(None);
                                }
                                syncer.observe(change);
                                dirty = true;
                            }
                        }
                        next = rx.try_recv().ok();
                    }
                }
            },
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= next_resync {
                    syncer.request_full();
                    next_resync = tokio::time::Instant::now() + args.resync_period;
                }
                retry_at = None;
                dirty = true;
            }
        }
        if !(ready && dirty) {
            continue;
        }
        dirty = false;
        let outcome = tokio::task::block_in_place(|| syncer.sync());
        let synced = Instant::now();
        health.record(outcome.succeeded(), synced);
        // Until a sync succeeds the change is not (all) in the kernel: the retry's sync counts.
        let change_to_kernel = if outcome.succeeded() {
            pending_since.take().map(|seen| synced.duration_since(seen))
        } else {
            None
        };
        if let Some(latency) = change_to_kernel {
            metrics.change_to_kernel.observe(latency.as_secs_f64());
        }
        for warning in &outcome.warnings {
            tracing::warn!(%warning, "sync");
        }
        for (port, e) in health_checks.update(&outcome.health_checks) {
            tracing::warn!(port, error = %e, "cannot listen on health-check node port; retrying");
            retry_at.get_or_insert(tokio::time::Instant::now() + backoff);
        }
        if outcome.succeeded() {
            backoff = Duration::from_secs(1);
            if let Some(latency) = change_to_kernel {
                tracing::info!(
                    full = outcome.full,
                    operations = outcome.operations,
                    change_to_kernel_ms = latency.as_secs_f64() * 1000.0,
                    "synced"
                );
            } else if outcome.operations > 0 || outcome.full {
                tracing::info!(full = outcome.full, operations = outcome.operations, "synced");
            }
        } else {
            for error in &outcome.errors {
                tracing::warn!(%error, "sync");
            }
            tracing::warn!(retry_in = ?backoff, failed = outcome.failed_operations, "sync incomplete; retrying");
            retry_at = Some(tokio::time::Instant::now() + backoff);
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// The agent's start under watch without its kernel, HTTP server or signals, for the memory
/// benchmark (`benches/agent_memory.rs`): the API watches ([`source::kube_source`]) feed
/// `syncer` as [`run_with`] does, until the source is ready; then one sync. The watches stay
/// open, their memory held, until the returned guard is dropped.
#[cfg(feature = "test-util")]
pub async fn first_sync_under_watch<D: Dataplane>(
    client: kube::Client,
    node_name: &str,
    mode: ProxyMode,
    syncer: &mut Syncer<D>,
) -> (sync::SyncOutcome, Watching) {
    let (tx, mut rx) = mpsc::channel::<Event>(4096);
    let task = tokio::spawn(source::kube_source(client, node_name.to_string(), mode, tx));
    loop {
        match rx.recv().await {
            Some(Event::Ready) => break,
            Some(Event::Change(change, _)) => syncer.observe(change),
            Some(Event::Refused(_)) => {}
            None => panic!("the agent's watches stopped before they were ready"),
        }
    }
    let outcome = syncer.sync();
    (outcome, Watching { _events: rx, task })
}

/// The watches of [`first_sync_under_watch`], open until dropped.
#[cfg(feature = "test-util")]
pub struct Watching {
    _events: mpsc::Receiver<Event>,
    task: tokio::task::JoinHandle<()>,
}

#[cfg(feature = "test-util")]
impl Drop for Watching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn proxy_config(args: &AgentArgs) -> Result<ProxyConfig, AgentError> {
    let mut config = ProxyConfig::new(args.node_name.clone(), args.mode);
    config.node_port_addresses =
        NodePortAddresses::parse(&args.nodeport_addresses).map_err(|message| AgentError::InvalidFlag {
            flag: "nodeport-addresses",
            message,
        })?;
    Ok(config)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::agent::fake::{FakeDataplane, FakeKernel};
    use crate::agent::test_support::{free_port, http_get};

    /// The whole response, or nothing while the server is not up yet.
    fn get(port: u16, path: &str) -> String {
        http_get(port, path).unwrap_or_default()
    }

    /// The flags of an agent run from `snapshot` (polled every 20 ms) in `mode`, serving its
    /// metrics on `metrics_port` of loopback.
    fn snapshot_args(snapshot: PathBuf, mode: ProxyMode, metrics_port: u16) -> AgentArgs {
        AgentArgs {
            node_name: "node-a".into(),
            interface: DEFAULT_INTERFACE.into(),
            masquerade_all: false,
            cluster_cidrs: vec![],
            resync_period: Duration::from_secs(60),
            mode,
            snapshot: vec![snapshot],
            snapshot_poll: Duration::from_millis(20),
            metrics_address: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), metrics_port),
            health_check_address: Ipv4Addr::LOCALHOST.into(),
            print_table: false,
            nodeport_addresses: vec![],
            ipvs_strict_arp: false,
            sysctl_root: "/proc/sys".into(),
        }
    }

    /// Polls `what` every 20 ms, failing the test after 10 s (naming `why`).
    fn wait_until(what: &dyn Fn() -> bool, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(Instant::now() < deadline, "timed out waiting for {why}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    const SNAPSHOT: &str = "
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 192.168.1.10}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {service.kubernetes.io/service-proxy-name: portpolicy}}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [ENDPOINT], nodeName: node-a}]
";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_agent_follows_its_snapshot_and_serves_its_endpoints() {
        let dir = std::env::temp_dir().join(format!("portpolicy-agent-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cluster.yaml");
        std::fs::write(&file, SNAPSHOT.replace("ENDPOINT", "10.0.1.2")).unwrap();
        let metrics_port = free_port();
        let args = snapshot_args(dir.clone(), ProxyMode::Delegated, metrics_port);
        let fake = FakeDataplane::new(FakeKernel::default());
        let agent = tokio::spawn(run_with(args, fake.clone()));
        let has_real = |address: &str| {
            let want: IpAddr = address.parse().unwrap();
            fake.state()
                .table
                .values()
                .any(|svc| svc.real_servers.keys().any(|r| r.address == want))
        };
        tokio::task::block_in_place(|| {
            wait_until(&|| get(metrics_port, "/readyz").contains(" 200 "), "readiness");
            assert!(has_real("10.0.1.2"));
            assert!(get(metrics_port, "/healthz").contains(" 200 "));
            // A changed endpoint in the file is applied without a restart, as one or two ops.
            let before = fake.state().ops_log.len();
            std::fs::write(&file, SNAPSHOT.replace("ENDPOINT", "10.0.1.33")).unwrap();
            wait_until(&|| has_real("10.0.1.33"), "the changed endpoint");
            let ops = fake.state().ops_log.len() - before;
            assert!((1..=2).contains(&ops), "{ops} operations");
            // Each sync that applied a change measured it, the start-up one and the change's.
            let applied = |metrics: &str| {
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix("portpolicy_agent_change_to_kernel_seconds_count "))
                    .map(str::to_string)
            };
            wait_until(
                &|| applied(&get(metrics_port, "/metrics")).as_deref() == Some("2"),
                "two change-to-kernel latencies",
            );
            let metrics = get(metrics_port, "/metrics");
            assert!(metrics.contains("portpolicy_agent_ipvs_operations_total{kind=\"add_real_server\"} 2"));
            assert!(metrics.contains("portpolicy_agent_virtual_servers 1"));
        });
        agent.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_bad_nodeport_addresses_flag_is_refused_before_anything_is_touched() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            agent: AgentArgs,
        }
        let parse = |value: &str| {
            Cli::try_parse_from(["agent", "--node-name", "node-a", "--nodeport-addresses", value])
                .unwrap()
                .agent
        };
        let args = parse("primary,10.0.0.0/8");
        assert_eq!(args.nodeport_addresses, ["primary", "10.0.0.0/8"]);
        let error = run(args).await.unwrap_err().to_string();
        assert_eq!(
            error,
            "--nodeport-addresses: \"primary\" must be the only value when given"
        );
        let error = run(parse("10.0.0.0")).await.unwrap_err().to_string();
        assert!(
            error.starts_with("--nodeport-addresses: \"10.0.0.0\" is not a CIDR"),
            "{error}"
        );
        let config = proxy_config(&parse("192.168.0.0/16,fd00::/8")).unwrap();
        assert_eq!(
            config.node_port_addresses,
            NodePortAddresses::Cidrs(vec![
                "192.168.0.0/16".parse().unwrap(),
                "fd00::/8".parse().unwrap()
            ])
        );
    }

    /// The same cluster as `kubectl get -o yaml` prints it: one List, `kind: List` after the items.
    fn kubectl_list(endpoint: &str) -> String {
        let items: String = SNAPSHOT
            .replace("ENDPOINT", endpoint)
            .split("---")
            .filter(|doc| !doc.trim().is_empty())
            .map(|doc| {
                let lines: Vec<&str> = doc.trim().lines().collect();
                format!("- {}\n", lines.join("\n  "))
            })
            .collect();
        format!("apiVersion: v1\nitems:\n{items}kind: List\nmetadata:\n  resourceVersion: \"\"\n")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_that_cannot_be_read_whole_is_refused_and_the_last_good_one_kept() {
        let dir = std::env::temp_dir().join(format!("portpolicy-agent-refuse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cluster.yaml");
        let good = kubectl_list("10.0.1.2");
        // Cut off after the first item: valid YAML, but without the `kind: List` that ends it.
        let second_item = good.match_indices("\n- ").nth(1).unwrap().0;
        let cut_at_an_item = &good[..second_item + 1];
        std::fs::write(&file, cut_at_an_item).unwrap();
        let metrics_port = free_port();
        // Replacement mode owns the whole table: an empty cluster would withdraw everything.
        let args = snapshot_args(file.clone(), ProxyMode::Replacement, metrics_port);
        let fake = FakeDataplane::new(FakeKernel::default());
        let agent = tokio::spawn(run_with(args, fake.clone()));
        let metric = |name: &str| {
            get(metrics_port, "/metrics")
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
                .unwrap_or_default()
        };
        tokio::task::block_in_place(|| {
            // Refused from the start: nothing is programmed and the agent is not ready.
            wait_until(
                &|| get(metrics_port, "/readyz").contains("nothing programmed yet"),
                "the first refusal",
            );
            let readyz = get(metrics_port, "/readyz");
            assert!(readyz.contains(" 503 "), "{readyz}");
            assert!(readyz.contains("cannot be read whole"), "{readyz}");
            assert!(readyz.contains("no kind: List"), "{readyz}");
            assert_eq!(metric("portpolicy_agent_snapshot_refused"), "1");
            assert!(fake.state().ops_log.is_empty(), "{:?}", fake.state().ops_log);

            std::fs::write(&file, &good).unwrap();
            wait_until(
                &|| get(metrics_port, "/readyz").contains(" 200 "),
                "the good snapshot",
            );
            let programmed = fake.state().table.clone();
            assert!(!programmed.is_empty());
            assert_eq!(metric("portpolicy_agent_snapshot_refused"), "0");

            // Cut mid-object, then emptied (as `>` does before writing): each refused, the
            // kernel table untouched, readiness says why.
            for (what, text) in [("half the file", &good[..good.len() / 2]), ("an empty file", "")] {
                let refusals: u64 = metric("portpolicy_agent_snapshot_refusals_total")
                    .parse()
                    .unwrap();
                std::fs::write(&file, text).unwrap();
                wait_until(
                    &|| {
                        metric("portpolicy_agent_snapshot_refusals_total")
                            .parse::<u64>()
                            .unwrap()
                            > refusals
                    },
                    what,
                );
                let readyz = get(metrics_port, "/readyz");
                assert!(readyz.contains(" 503 "), "{what}: {readyz}");
                assert!(
                    readyz.contains("still programming the last good snapshot"),
                    "{what}: {readyz}"
                );
                assert_eq!(metric("portpolicy_agent_snapshot_refused"), "1", "{what}");
                std::thread::sleep(Duration::from_millis(100));
                assert_eq!(
                    fake.state().table,
                    programmed,
                    "{what}: the last good plan stays programmed"
                );
            }

            std::fs::write(&file, kubectl_list("10.0.1.9")).unwrap();
            wait_until(&|| get(metrics_port, "/readyz").contains(" 200 "), "recovery");
            assert_eq!(metric("portpolicy_agent_snapshot_refused"), "0");
            // Readiness follows the source; the sync of the new snapshot may land just after.
            wait_until(
                &|| fake.state().table != programmed,
                "the new snapshot to be followed again",
            );
        });
        agent.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations_parse_like_kubernetes_flags() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
