use clap::Parser;

use nomad_driver_qemu::cli::Cli;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    nomad_driver_qemu::cli::dispatch(cli)
}
