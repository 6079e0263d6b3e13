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
    }
}
