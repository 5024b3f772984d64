//! Layered configuration shared by every Herald binary, and the shutdown signal they share.
//!
//! Each service deserialises its own struct from one layered source: the struct's `Default`
//! (which reaches the localhost services and the provider sandbox), then `herald.toml` (or the
//! file named by `HERALD_CONFIG`), then `HERALD_*` environment variables with `__` between
//! levels (`HERALD_AMQP__URL`, `HERALD_INGRESS__LISTEN`). Sections a service does not know are
//! ignored, so one file can configure the whole deployment.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    File {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("configuration: {0}")]
    Invalid(#[from] config::ConfigError),
}

/// Loads `T` from defaults, then the config file, then the environment.
///
/// `file` overrides `HERALD_CONFIG`; when neither is set, `./herald.toml` is read if present.
pub fn load<T: DeserializeOwned + Serialize + Default>(
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    load_with_env(file, None)
}

/// `load`, with the environment given as a map instead of read from the process (for tests).
pub fn load_with_env<T: DeserializeOwned + Serialize + Default>(
    file: Option<&Path>,
    env: Option<config::Map<String, String>>,
) -> Result<T, ConfigError> {
    let explicit = file
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("HERALD_CONFIG").map(PathBuf::from));
    let defaults = config::Config::try_from(&T::default())?;
    let mut builder = config::Config::builder().add_source(defaults);
    match &explicit {
        Some(path) => {
            if !path.exists() {
                return Err(ConfigError::File {
                    path: path.clone(),
                    source: config::ConfigError::Message("file not found".into()),
                });
            }
            builder = builder.add_source(config::File::from(path.as_path()).required(true));
        }
        None => {
            builder = builder.add_source(config::File::with_name("herald").required(false));
        }
    }
    builder = builder.add_source(
        config::Environment::with_prefix("HERALD")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(env),
    );
    let built = builder.build().map_err(|source| match &explicit {
        Some(path) => ConfigError::File {
            path: path.clone(),
            source,
        },
        None => ConfigError::Invalid(source),
    })?;
    Ok(built.try_deserialize()?)
}

/// Redis connection shared by the services that keep cross-replica state there.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisSettings {
    pub url: String,
    /// Every key Herald writes starts with this, so deployments (and test runs) can share a server.
    pub key_prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".into(),
            key_prefix: "herald:".into(),
        }
    }
}

/// How one service finds another over HTTP inside the deployment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenServiceClientSettings {
    /// Base URL of the token service.
    pub url: String,
    /// Shared bearer secret between the services and the token service.
    pub auth_token: String,
}

impl Default for TokenServiceClientSettings {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8091".into(),
            auth_token: "dev-internal-token".into(),
        }
    }
}

/// A token cancelled on SIGTERM or Ctrl-C: the shutdown signal every binary hands its `run()`.
pub fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(error) => {
                        tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C only");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct Sample {
        redis: RedisSettings,
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let dir = std::env::temp_dir().join(format!("herald-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("herald.toml");
        std::fs::write(
            &file,
            "[redis]\nurl = \"redis://file/\"\nkey_prefix = \"file:\"\n",
        )
        .expect("write config");
        let env = config::Map::from([("HERALD_REDIS__KEY_PREFIX".to_string(), "env:".to_string())]);
        let loaded: Sample = load_with_env(Some(&file), Some(env)).expect("load");
        assert_eq!(loaded.redis.url, "redis://file/");
        assert_eq!(loaded.redis.key_prefix, "env:");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = load::<Sample>(Some(Path::new("/nonexistent/herald.toml"))).expect_err("invalid");
        assert!(err.to_string().contains("/nonexistent/herald.toml"));
    }
}
