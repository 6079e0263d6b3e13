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
    /// Talk to the kernel directly: inspect and exercise IPVS and the dummy interface.
    #[cfg(target_os = "linux")]
    #[command(subcommand)]
    Debug(portpolicy::netlink::debug::DebugCommand),
    /// Run the node agent: program this node's IPVS from the plan, changing only what differs.
    Agent(portpolicy::agent::AgentArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", PortPolicy::crd_yaml());
            ExitCode::SUCCESS
        }
        #[cfg(target_os = "linux")]
        Command::Debug(command) => command.run(),
        Command::Agent(args) => run_agent(args),
    }
}

fn run_agent(args: portpolicy::agent::AgentArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portpolicy agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(portpolicy::agent::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent stopped");
            ExitCode::FAILURE
        }
    }
}
