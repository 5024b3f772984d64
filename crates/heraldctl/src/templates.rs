//! `heraldctl templates apply -f DIR`: templates as files in Git, applied through the ingress
//! API. Every file is checked before any is sent; an unchanged file creates nothing, a changed
//! one becomes a new version that is then published.

use std::path::{Path, PathBuf};

use herald_renderer::TemplateDefinition;
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}: no template files (*.yaml, *.yml)")]
    Empty(PathBuf),
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{path}: the ingress answered {status}: {body}")]
    Rejected {
        path: PathBuf,
        status: reqwest::StatusCode,
        body: String,
    },
}

/// What applying one file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The published version already holds this definition.
    Unchanged { version: i32 },
    /// `version` is now published; `created` when this run stored it.
    Published { version: i32, created: bool },
    /// Dry run: applying would store a new version and publish it.
    WouldCreate,
    /// Dry run: applying would publish `version`, which already holds this definition.
    WouldPublish { version: i32 },
}

#[derive(Debug, Clone)]
pub struct Applied {
    pub path: PathBuf,
    pub id: String,
    pub outcome: Outcome,
}

#[derive(Deserialize)]
struct DryRun {
    would_create: bool,
    latest_version: Option<i32>,
    published_version: Option<i32>,
}

#[derive(Deserialize)]
struct Created {
    version: i32,
    created: bool,
    published_version: Option<i32>,
}

/// The template files of `dir`, by name.
fn template_files(dir: &Path) -> Result<Vec<PathBuf>, ApplyError> {
    let file_error = |e: std::io::Error| ApplyError::File {
        path: dir.to_path_buf(),
        message: e.to_string(),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(file_error)? {
        let path = entry.map_err(file_error)?.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ApplyError::Empty(dir.to_path_buf()));
    }
    Ok(files)
}

/// Applies every template file in `dir` to the tenant of `api_key` at the ingress `base_url`
/// (with `dry_run`, only says what applying would do).
pub async fn apply(
    http: &reqwest::Client,
    base_url: &str,
    api_key: &str,
    dir: &Path,
    dry_run: bool,
) -> Result<Vec<Applied>, ApplyError> {
    // Check every file first, so a broken one changes nothing.
    let mut files = Vec::new();
    for path in template_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|e| ApplyError::File {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let definition = TemplateDefinition::from_yaml(&text)
            .and_then(|d| d.validate().map(|()| d))
            .map_err(|e| ApplyError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
        files.push((path, text, definition.id));
    }
    let base_url = base_url.trim_end_matches('/');
    let mut applied = Vec::with_capacity(files.len());
    for (path, text, id) in files {
        if dry_run {
            let url = format!("{base_url}/v1/templates?dry_run=true");
            let response = http
                .post(&url)
                .bearer_auth(api_key)
                .header("content-type", "application/yaml")
                .body(text)
                .send()
                .await
                .map_err(|source| ApplyError::Http {
                    url: url.clone(),
                    source,
                })?;
            let answer: DryRun = answer(&path, &url, response).await?;
            let outcome = match (answer.would_create, answer.latest_version) {
                (false, Some(version)) if answer.published_version == Some(version) => {
                    Outcome::Unchanged { version }
                }
                (false, Some(version)) => Outcome::WouldPublish { version },
                _ => Outcome::WouldCreate,
            };
            applied.push(Applied { path, id, outcome });
            continue;
        }
        let url = format!("{base_url}/v1/templates");
        let response = http
            .post(&url)
            .bearer_auth(api_key)
            .header("content-type", "application/yaml")
            .body(text)
            .send()
            .await
            .map_err(|source| ApplyError::Http {
                url: url.clone(),
                source,
            })?;
        let created: Created = answer(&path, &url, response).await?;
        let outcome = if created.published_version == Some(created.version) {
            Outcome::Unchanged {
                version: created.version,
            }
        } else {
            let url = format!("{base_url}/v1/templates/{id}/publish");
            let response = http
                .post(&url)
                .bearer_auth(api_key)
                .json(&json!({ "version": created.version }))
                .send()
                .await
                .map_err(|source| ApplyError::Http {
                    url: url.clone(),
                    source,
                })?;
            let _: serde_json::Value = answer(&path, &url, response).await?;
            Outcome::Published {
                version: created.version,
                created: created.created,
            }
        };
        applied.push(Applied { path, id, outcome });
    }
    Ok(applied)
}

async fn answer<T: for<'de> Deserialize<'de>>(
    path: &Path,
    url: &str,
    response: reqwest::Response,
) -> Result<T, ApplyError> {
    let status = response.status();
    if !status.is_success() {
        return Err(ApplyError::Rejected {
            path: path.to_path_buf(),
            status,
            body: response.text().await.unwrap_or_default(),
        });
    }
    response.json().await.map_err(|source| ApplyError::Http {
        url: url.to_string(),
        source,
    })
}
