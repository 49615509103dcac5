//! `nomad-driver-qemu run`: one VM in the foreground.

/// Options of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {}

/// Runs `run`.
pub fn main(_args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("`run` is not built yet")
}
