use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use portpolicy::snapshot_files::load_paths;
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::ipvs::{NodePortAddresses, ProxyMode};
use portpolicy_core::plan::{Plan, PlanFormat, PlanOptions};
use portpolicy_core::ports::PortRange;

/// Predictable Kubernetes ports: nodePort allocation, hostPort conflicts and IPVS programming.
#[derive(Parser, Debug)]
#[command(name = "portpolicy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Plan a cluster snapshot offline: nodePort allocations, hostPort conflicts, each node's IPVS rules.
    Plan(PlanArgs),
    /// Print the PortPolicy CustomResourceDefinition as YAML.
    Crd,
    /// Run the operator: allocate nodePorts, report hostPort conflicts, deploy agents.
    Operator(portpolicy::operator::controller::OperatorArgs),
    /// Run the node agent: program this node's IPVS from the plan, changing only what differs.
    Agent(portpolicy::agent::AgentArgs),
    /// Talk to the kernel directly: inspect and exercise IPVS and the dummy interface.
    #[cfg(target_os = "linux")]
    #[command(subcommand)]
    Debug(portpolicy::debug::DebugCommand),
}

#[derive(clap::Args, Debug)]
struct PlanArgs {
    /// Snapshot files or directories (YAML or JSON as `kubectl get -o yaml|json` prints it, a
    /// List, or several documents), or `-` for standard input. Without any, the cluster of the
    /// kubeconfig's current context is listed, read-only.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// The kubeconfig to read the cluster with (default: `KUBECONFIG`, then `~/.kube/config`,
    /// then the in-cluster service account).
    #[arg(long, conflicts_with = "files")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, conflicts_with = "files")]
    context: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Show IPVS rules for this node only.
    #[arg(long)]
    node: Option<String>,
    /// Which Services get IPVS rules: `replacement` (the default) shows a cluster without
    /// kube-proxy; `delegated` only Services labeled
    /// `service.kubernetes.io/service-proxy-name: portpolicy`, as the agent next to kube-proxy.
    #[arg(long, value_parser = portpolicy::flags::proxy_mode(), default_value = "replacement")]
    mode: ProxyMode,
    /// The earlier spelling of `--mode delegated`.
    #[arg(long, hide = true, conflicts_with = "mode")]
    delegated: bool,
    /// The cluster's --service-node-port-range.
    #[arg(long, default_value = "30000-32767", value_parser = parse_range)]
    service_node_port_range: PortRange,
    /// Judge retention windows at this time (RFC 3339) instead of now, for reproducible plans.
    #[arg(long)]
    now: Option<DateTime<Utc>>,
    /// Plan node ports only on these of the Node's addresses, as the agent given the same
    /// `--nodeport-addresses` (CIDRs, or `primary`); every address when not given.
    #[arg(long = "nodeport-addresses", value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn parse_range(text: &str) -> Result<PortRange, String> {
    text.parse()
}

/// The name kubectl gives a plugin's executable: `kubectl portpolicy` runs `kubectl-portpolicy`.
const KUBECTL_PLUGIN: &str = "kubectl-portpolicy";

fn main() -> ExitCode {
    let mut command = Cli::command();
    // Installed as a kubectl plugin (a copy or symlink named kubectl-portpolicy), usage and
    // errors name the command the user typed.
    let invoked = std::env::args_os().next().map(PathBuf::from);
    if invoked
        .as_deref()
        .and_then(|p| p.file_stem())
        .is_some_and(|stem| stem == KUBECTL_PLUGIN)
    {
        command = command.bin_name("kubectl portpolicy");
    }
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Plan(args) => {
            // The client logs every failed request; plan reports each failure itself.
            init_tracing(false, "warn,kube_client::client::builder=off");
            plan(args)
        }
        Command::Crd => print_stdout(&PortPolicy::crd_yaml()),
        Command::Operator(args) => {
            init_tracing(true, "info");
            run_async(
                "operator",
                portpolicy::operator::controller::run(args),
                portpolicy::operator::Error::exit_code,
            )
        }
        Command::Agent(args) => {
            init_tracing(false, "info");
            run_async("agent", portpolicy::agent::run(args), |_| 1)
        }
        #[cfg(target_os = "linux")]
        Command::Debug(command) => command.run(),
    }
}

fn plan(args: PlanArgs) -> ExitCode {
    // A bad flag is refused before the cluster is read.
    let node_port_addresses = match NodePortAddresses::parse(&args.nodeport_addresses) {
        Ok(addresses) => addresses,
        Err(e) => {
            eprintln!("portpolicy plan: --nodeport-addresses: {e}");
            return ExitCode::from(2);
        }
    };
    let loaded = if args.files.is_empty() {
        let target = portpolicy::live::Target {
            kubeconfig: args.kubeconfig.clone(),
            context: args.context.clone(),
        };
        let read = async {
            let (config, name) = portpolicy::live::config(&target).await?;
            eprintln!("portpolicy plan: listing the cluster at {name} (read-only)");
            portpolicy::live::load_cluster(config).await
        };
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("portpolicy plan: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(read) {
            Ok(loaded) => loaded,
            Err(e) => {
                eprintln!("portpolicy plan: {e}");
                eprintln!("(give snapshot files with -f, or a cluster with --kubeconfig and --context)");
                return ExitCode::FAILURE;
            }
        }
    } else {
        load_paths(&args.files)
    };
    let options = PlanOptions {
        node_port_range: args.service_node_port_range,
        mode: if args.delegated {
            ProxyMode::Delegated
        } else {
            args.mode
        },
        node: args.node,
        node_port_addresses,
        now: args.now.unwrap_or_else(Utc::now),
    };
    let mut plan = Plan::new(&loaded.snapshot, &options);
    plan.problems.extend(loaded.problems);
    let format = match args.output {
        Output::Table => PlanFormat::Table,
        Output::Json => PlanFormat::Json,
    };
    // Written as planned: without --node, node by node.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let printed = written(plan.write(format, &mut out).and_then(|()| out.flush()));
    if loaded.snapshot.object_count() == 0 {
        for problem in &loaded.unreadable {
            eprintln!("portpolicy plan: {problem}");
        }
        eprintln!("portpolicy plan: no Kubernetes objects could be read; nothing was planned");
        return ExitCode::FAILURE;
    }
    printed
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print_stdout(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    written(out.write_all(text.as_bytes()).and_then(|()| out.flush()))
}

/// What writing the output ended in, as an exit code.
fn written(result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portpolicy: cannot write output: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to standard error (standard output is `plan`'s and `crd`'s), coloured only on a
/// terminal; `RUST_LOG` overrides the level.
fn init_tracing(json: bool, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run_async<E: std::fmt::Display>(
    what: &str,
    future: impl Future<Output = Result<(), E>>,
    exit_code: impl Fn(&E) -> u8,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("portpolicy {what}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "{what} stopped");
            ExitCode::from(exit_code(&error))
        }
    }
}
