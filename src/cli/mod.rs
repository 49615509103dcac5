//! The binary's command line: plugin mode for Nomad, plus `run` and `qmp` for operators.

pub mod qmp;
pub mod run;

use clap::{Parser, Subcommand};

/// QEMU task driver for Nomad. Started by a Nomad client agent without a subcommand, it serves
/// the driver plugin protocol; the subcommands work without Nomad.
#[derive(Debug, Parser)]
#[command(name = "nomad-driver-qemu", version, about)]
pub struct Cli {
    /// Driver name reported to Nomad (default: derived from the binary's file name).
    #[arg(long, env = "NOMAD_DRIVER_QEMU_NAME")]
    pub plugin_name: Option<String>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Operator subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot one VM in the foreground, print its state changes and stats, stop it gracefully
    /// on Ctrl-C or SIGTERM.
    Run(Box<run::RunArgs>),
    /// Send one QMP command to a running VM's QMP socket and print the reply.
    Qmp(qmp::QmpArgs),
}

/// Runs the command that `cli` selects.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => crate::driver::nomad::plugin::run_plugin(cli.plugin_name),
        Some(Command::Run(args)) => run::main(*args),
        Some(Command::Qmp(args)) => qmp::main(args),
    }
}
