//! Plugin process entry point.

/// Serves the Nomad driver plugin protocol until Nomad shuts the plugin down.
pub fn run_plugin(_name: Option<String>) -> anyhow::Result<()> {
    anyhow::bail!("plugin mode is not built yet")
}
