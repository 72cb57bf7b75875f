//! meshctl: the operator's command line for the mesh.
//!
//! Owns argument parsing and the process exit code; each subcommand lives in its own module.
//! It must not hold mesh logic of its own: subcommands drive the real binaries and APIs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod analyze;
mod demo;
mod http;
mod proxy_status;
mod ztunnel_config;

#[derive(Parser, Debug)]
#[command(name = "meshctl", version, about = "Operate the ambient mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a two-node mesh on loopback, send traffic through it and show what happened.
    Demo(demo::DemoArgs),
    /// Check a directory of manifests for mistakes the mesh would otherwise skip silently.
    Analyze(analyze::AnalyzeArgs),
    /// Show what a ztunnel holds (from its admin /config_dump): workloads, services,
    /// policies or certificates.
    ZtunnelConfig(ztunnel_config::ZtunnelConfigArgs),
    /// Show the proxies connected to the controller and whether each ACKed what it serves
    /// (from the controller's /debug/syncz).
    ProxyStatus(proxy_status::ProxyStatusArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args).await,
        Command::Analyze(args) => analyze::run(&args),
        Command::ZtunnelConfig(args) => ztunnel_config::run(&args).await,
        Command::ProxyStatus(args) => proxy_status::run(&args).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("meshctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
