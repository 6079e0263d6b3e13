use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use portpolicy::snapshot_files::load_paths;
use portpolicy_core::crd::PortPolicy;
use portpolicy_core::ipvs::ProxyMode;
use portpolicy_core::plan::{PlanOptions, build_plan};
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
    /// Snapshot files or directories (YAML as `kubectl get -o yaml` prints it, a List, or several documents).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Show IPVS rules for this node only.
    #[arg(long)]
    node: Option<String>,
    /// Plan only Services labeled `service.kubernetes.io/service-proxy-name: portpolicy`, as the
    /// agent does next to kube-proxy; the default shows the view of a cluster without kube-proxy.
    #[arg(long)]
    delegated: bool,
    /// The cluster's --service-node-port-range.
    #[arg(long, default_value = "30000-32767", value_parser = parse_range)]
    service_node_port_range: PortRange,
    /// Judge retention windows at this time (RFC 3339) instead of now, for reproducible plans.
    #[arg(long)]
    now: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn parse_range(text: &str) -> Result<PortRange, String> {
    text.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plan(args) => plan(args),
        Command::Crd => print_stdout(&PortPolicy::crd_yaml()),
        Command::Operator(args) => {
            init_tracing(true);
            run_async(
                "operator",
                portpolicy::operator::controller::run(args),
                portpolicy::operator::Error::exit_code,
            )
        }
        Command::Agent(args) => {
            init_tracing(false);
            run_async("agent", portpolicy::agent::run(args), |_| 1)
        }
        #[cfg(target_os = "linux")]
        Command::Debug(command) => command.run(),
    }
}

fn plan(args: PlanArgs) -> ExitCode {
    let loaded = match load_paths(&args.files) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("portpolicy plan: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = PlanOptions {
        node_port_range: args.service_node_port_range,
        mode: if args.delegated {
            ProxyMode::Delegated
        } else {
            ProxyMode::Replacement
        },
        node: args.node,
        now: args.now.unwrap_or_else(Utc::now),
    };
    let mut report = build_plan(&loaded.snapshot, &options);
    report.problems.extend(loaded.problems);
    report.problems.sort();
    let text = match args.output {
        Output::Table => report.to_table(),
        Output::Json => report.to_json(),
    };
    let printed = print_stdout(&text);
    if loaded.snapshot.object_count() == 0 {
        eprintln!("portpolicy plan: no Kubernetes objects could be read; nothing was planned");
        return ExitCode::FAILURE;
    }
    printed
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print_stdout(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portpolicy: cannot write output: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
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
