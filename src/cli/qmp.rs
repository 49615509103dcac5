//! `nomad-driver-qemu qmp`: one QMP command to a running VM.

/// Options of `qmp`.
#[derive(Debug, clap::Args)]
pub struct QmpArgs {}

/// Runs `qmp`.
pub fn main(_args: QmpArgs) -> anyhow::Result<()> {
    anyhow::bail!("`qmp` is not built yet")
}
