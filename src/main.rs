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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", PortPolicy::crd_yaml());
            ExitCode::SUCCESS
        }
    }
}
