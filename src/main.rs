use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portpolicy::crd::PortPolicy;

/// Predictable Kubernetes ports: nodePort allocation, hostPort conflicts and IPVS programming.
#[derive(Parser, Debug)]
#[command(name = "portpolicy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the PortPolicy CustomResourceDefinition as YAML.
    Crd,
    /// Run the operator: allocate nodePorts, report hostPort conflicts, deploy agents.
    Operator(portpolicy::operator::controller::OperatorArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", PortPolicy::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Operator(args) => run_operator(args),
    }
}

fn run_operator(args: portpolicy::operator::controller::OperatorArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .json()
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("portpolicy operator: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(portpolicy::operator::controller::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "operator stopped");
            ExitCode::FAILURE
        }
    }
}
