//! `BasePlugin`: the plugin's identity, its configuration schema and its configuration.

use std::sync::{Arc, RwLock};

use tonic::{Request, Response, Status};

use super::config::PluginConfig;
use super::error::{to_status, DriverError};
use super::proto::base::{
    base_plugin_server::BasePlugin, ConfigSchemaRequest, ConfigSchemaResponse, NomadConfig,
    PluginInfoRequest, PluginInfoResponse, PluginType, SetConfigRequest, SetConfigResponse,
};
use super::schema;

/// The only driver plugin API version Nomad speaks (v1.6.5 `plugins/drivers/versions.go`).
pub const DRIVER_API_VERSION: &str = "0.1.0";

/// Configuration received by the last `SetConfig` call.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The agent's `plugin` block `config`, decoded and validated.
    pub plugin: PluginConfig,
    /// The client agent's settings; absent when Nomad starts the plugin only to validate its
    /// configuration.
    pub nomad: Option<NomadConfig>,
    /// The API version Nomad negotiated.
    pub api_version: String,
}

/// State shared by the services of one plugin process.
#[derive(Debug)]
pub struct PluginState {
    name: String,
    settings: RwLock<Arc<Settings>>,
}

impl PluginState {
    /// Creates the state of a plugin reporting itself to Nomad as `name`.
    pub fn new(name: String) -> Self {
        Self {
            name,
            settings: RwLock::new(Arc::new(Settings::default())),
        }
    }

    /// Name reported to Nomad: the `driver` value of jobs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the configuration of the last successful `SetConfig`, or the defaults.
    pub fn settings(&self) -> Arc<Settings> {
        // A poisoned lock still contains a complete Arc, so its value is safe to read.
        let guard = self
            .settings
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(&guard)
    }

    fn replace_settings(&self, settings: Settings) {
        let mut guard = self
            .settings
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = Arc::new(settings);
    }
}

/// The `BasePlugin` service.
pub struct BaseService {
    state: Arc<PluginState>,
}

impl BaseService {
    /// Creates the service over the plugin's shared state.
    pub fn new(state: Arc<PluginState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl BasePlugin for BaseService {
    async fn plugin_info(
        &self,
        _request: Request<PluginInfoRequest>,
    ) -> Result<Response<PluginInfoResponse>, Status> {
        Ok(Response::new(PluginInfoResponse {
            r#type: PluginType::Driver.into(),
            plugin_api_versions: vec![DRIVER_API_VERSION.to_owned()],
            plugin_version: env!("CARGO_PKG_VERSION").to_owned(),
            name: self.state.name().to_owned(),
        }))
    }

    async fn config_schema(
        &self,
        _request: Request<ConfigSchemaRequest>,
    ) -> Result<Response<ConfigSchemaResponse>, Status> {
        Ok(Response::new(ConfigSchemaResponse {
            spec: Some(schema::config_spec()),
        }))
    }

    /// Decodes and validates the plugin configuration and keeps it. Nomad calls this in
    /// short-lived processes that only validate, so it has no other effect.
    async fn set_config(
        &self,
        request: Request<SetConfigRequest>,
    ) -> Result<Response<SetConfigResponse>, Status> {
        let request = request.into_inner();
        let settings = decode_settings(request).map_err(|error| {
            tracing::error!(error = %error, "rejected the plugin configuration");
            to_status(&error)
        })?;

        tracing::info!(
            api_version = %settings.api_version,
            validation_only = settings.nomad.is_none(),
            image_paths = ?settings.plugin.image_paths,
            args_allowlist = ?settings.plugin.args_allowlist,
            emulators_allowlist = ?settings.plugin.emulators_allowlist,
            "plugin configured"
        );
        warn_missing_image_paths(&settings.plugin);
        self.state.replace_settings(settings);
        Ok(Response::new(SetConfigResponse {}))
    }
}

/// Warns about `image_paths` entries that are not existing directories. They are kept, because
/// a directory may be mounted or created after the agent starts.
fn warn_missing_image_paths(plugin: &PluginConfig) {
    for dir in &plugin.image_paths {
        if !dir.is_dir() {
            tracing::warn!(
                image_path = %dir.display(),
                "image_paths entry is not an existing directory; tasks cannot use images from it until it exists"
            );
        }
    }
}

fn decode_settings(request: SetConfigRequest) -> Result<Settings, DriverError> {
    let plugin =
        PluginConfig::decode(&request.msgpack_config).map_err(DriverError::InvalidPluginConfig)?;
    plugin
        .validate()
        .map_err(DriverError::PluginConfigRejected)?;
    Ok(Settings {
        plugin,
        nomad: request.nomad_config,
        api_version: request.plugin_api_version,
    })
}
