//! Template definitions, their validation and strict rendering.
//!
//! A definition is a YAML file (stored as JSON in Postgres, one immutable row per version): an
//! id, the variables it takes with their types, and one variant per channel, optionally
//! overridden per locale (`zh_CN` → `zh` → the default variants). Validation at publish checks
//! that every variable used is declared and that every variant renders within its channel's
//! limits from sample data. Rendering is strict: a missing or mistyped variable is a permanent
//! rejection that names the variable, never a blank field.

mod cache;
mod fields;
mod variants;

use std::collections::BTreeMap;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use cache::{ControlMessage, TemplateCache};
pub use variants::{
    DINGTALK, EMAIL, FEISHU, SMS, TEMPLATE_CHANNELS, Variants, WEBHOOK, WECHAT_SUBSCRIBE,
    WECHAT_TEMPLATE, WECOM,
};

use variants::Variant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateDefinition {
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// What kind of notification this is (`order`, `security`, `marketing`): what recipients'
    /// preferences are keyed on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub category: String,
    #[serde(default)]
    pub variables: BTreeMap<String, VariableSpec>,
    /// The default variants, by channel.
    pub channels: Variants,
    /// Per-locale variants (`zh_CN`, `en`), each falling back to the default per channel.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub locales: BTreeMap<String, Variants>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariableSpec {
    #[serde(rename = "type", default)]
    pub kind: VariableType,
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Sample value for previews and publish-time validation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub example: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VariableType {
    #[default]
    String,
    Number,
    Boolean,
    /// A JSON array, for `{% for %}` loops (order lines in an e-mail).
    List,
    /// A JSON object, for `{{ order.id }}`.
    Object,
}

impl VariableType {
    /// The name with its article, for messages.
    fn described(self) -> &'static str {
        match self {
            VariableType::Object => "an object",
            VariableType::String => "a string",
            VariableType::Number => "a number",
            VariableType::Boolean => "a boolean",
            VariableType::List => "a list",
        }
    }

    fn accepts(self, value: &Value) -> bool {
        match self {
            VariableType::String => value.is_string(),
            VariableType::Number => value.is_number(),
            VariableType::Boolean => value.is_boolean(),
            VariableType::List => value.is_array(),
            VariableType::Object => value.is_object(),
        }
    }
}

/// Why a template or a request cannot be rendered; always permanent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RenderError {
    pub field: String,
    pub message: String,
}

impl RenderError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The instructions one template string may execute.
const RENDER_FUEL: u64 = 100_000;

/// minijinja's global functions, which templates may call without declaring them.
const BUILTINS: &[&str] = &["range", "dict", "namespace", "debug"];

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// `zh_CN`, `zh-CN`, `en`: a language and an optional region.
fn valid_locale(locale: &str) -> bool {
    let mut parts = locale.split(['_', '-']);
    let language = parts.next().unwrap_or_default();
    let region = parts.next();
    (2..=3).contains(&language.len())
        && language.chars().all(|c| c.is_ascii_alphabetic())
        && region.is_none_or(|r| {
            (2..=4).contains(&r.len()) && r.chars().all(|c| c.is_ascii_alphanumeric())
        })
        && parts.next().is_none()
}

/// Where a field sits in the definition, for error messages.
fn field_path(scope: &str, channel: &str, path: &str) -> String {
    let base = if scope.is_empty() {
        format!("channels.{channel}")
    } else {
        format!("locales.{scope}.{channel}")
    };
    if path.is_empty() {
        base
    } else {
        format!("{base}.{path}")
    }
}

/// The compiled template's name in the environment.
fn template_name(scope: &str, channel: &str, path: &str) -> String {
    format!("{scope}|{channel}|{path}")
}

/// HTML bodies are auto-escaped; everything else (text, markdown, WeChat values) is not.
fn auto_escape(name: &str) -> AutoEscape {
    let mut parts = name.splitn(3, '|');
    let (_scope, channel, path) = (parts.next(), parts.next(), parts.next());
    if channel == Some(EMAIL) && path == Some("html") {
        AutoEscape::Html
    } else {
        AutoEscape::None
    }
}

/// Protobuf's `Struct` carries every number as a double: show `3.0` as `3`.
fn normalize_numbers(variables: &Map<String, Value>) -> Map<String, Value> {
    fn normalize(value: &Value) -> Value {
        match value {
            Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => {
                    // Exact: |f| < 2^53.
                    Value::from(f as i64)
                }
                _ => value.clone(),
            },
            Value::Array(items) => Value::Array(items.iter().map(normalize).collect()),
            Value::Object(map) => {
                Value::Object(map.iter().map(|(k, v)| (k.clone(), normalize(v))).collect())
            }
            other => other.clone(),
        }
    }
    variables
        .iter()
        .map(|(k, v)| (k.clone(), normalize(v)))
        .collect()
}

impl TemplateDefinition {
    /// Parses a template file; an error names the field (`channels.wecom.msgtype`).
    pub fn from_yaml(text: &str) -> Result<Self, RenderError> {
        let deserializer = yaml_serde::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let field = if path.is_empty() || path == "." || path == "?" {
                "definition".to_string()
            } else {
                path
            };
            // The YAML error starts with (a prefix of) the path too; say it once.
            let message = e.into_inner().to_string();
            let message = match message.split_once(": ") {
                Some((path, rest)) if field.starts_with(path) => rest.to_string(),
                _ => message,
            };
            RenderError::new(field, message)
        })
    }

    /// Reads a stored definition.
    pub fn from_json(value: Value) -> Result<Self, RenderError> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            RenderError::new(
                format!("template.{}", e.path()),
                format!("stored definition invalid: {}", e.inner()),
            )
        })
    }

    /// The form stored in Postgres: equal definitions give equal JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// The channels with a default variant.
    pub fn channel_names(&self) -> Vec<&'static str> {
        self.channels.names()
    }

    /// The default variants, then each locale's.
    fn scopes(&self) -> impl Iterator<Item = (&str, &Variants)> {
        std::iter::once(("", &self.channels))
            .chain(self.locales.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// The variant for `channel` in `locale`: `zh_CN`, then `zh`, then the default.
    fn variant_for(
        &self,
        channel: &str,
        locale: &str,
    ) -> Option<(&str, &'static str, &dyn Variant)> {
        let normalized = locale.replace('-', "_");
        let language = normalized.split('_').next().unwrap_or_default().to_string();
        for candidate in [normalized, language] {
            if candidate.is_empty() {
                continue;
            }
            if let Some((scope, variants)) = self.locales.get_key_value(&candidate)
                && let Some((name, variant)) = variants.get(channel)
            {
                return Some((scope.as_str(), name, variant));
            }
        }
        self.channels
            .get(channel)
            .map(|(name, variant)| ("", name, variant))
    }

    /// Checks the request's variables against the declaration.
    pub fn check_variables(&self, variables: &Map<String, Value>) -> Result<(), RenderError> {
        for (name, spec) in &self.variables {
            let field = format!("variables.{name}");
            match variables.get(name) {
                None | Some(Value::Null) if spec.required => {
                    return Err(RenderError::new(field, "required by the template"));
                }
                None | Some(Value::Null) => {}
                Some(value) if !spec.kind.accepts(value) => {
                    return Err(RenderError::new(
                        field,
                        format!("must be {}", spec.kind.described()),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Every declared variable with its example, or a stand-in of its type.
    pub fn sample_variables(&self) -> Map<String, Value> {
        self.variables
            .iter()
            .map(|(name, spec)| {
                let value = spec.example.clone().unwrap_or_else(|| match spec.kind {
                    VariableType::String => Value::String(name.clone()),
                    VariableType::Number => Value::from(1),
                    VariableType::Boolean => Value::Bool(true),
                    VariableType::List => Value::Array(Vec::new()),
                    VariableType::Object => Value::Object(Map::new()),
                });
                (name.clone(), value)
            })
            .collect()
    }

    /// Publish-time validation: names, every template compiles and uses only declared
    /// variables, each variant's own rules, and every variant (in every locale) renders from
    /// the sample variables within its channel's limits.
    pub fn validate(&self) -> Result<(), RenderError> {
        if !valid_id(&self.id) {
            return Err(RenderError::new(
                "id",
                "required: letters, digits, `_`, `.` or `-`, at most 128",
            ));
        }
        for (name, spec) in &self.variables {
            if !valid_name(name) {
                return Err(RenderError::new(
                    format!("variables.{name}"),
                    "a variable name is letters, digits and `_`, not starting with a digit",
                ));
            }
            if let Some(example) = &spec.example
                && !spec.kind.accepts(example)
            {
                return Err(RenderError::new(
                    format!("variables.{name}.example"),
                    format!("must be {}", spec.kind.described()),
                ));
            }
        }
        if self.channels.names().is_empty() {
            return Err(RenderError::new(
                "channels",
                format!(
                    "at least one variant is required (channels: {})",
                    TEMPLATE_CHANNELS.join(", ")
                ),
            ));
        }
        for (locale, variants) in &self.locales {
            if !valid_locale(locale) {
                return Err(RenderError::new(
                    format!("locales.{locale}"),
                    "not a locale like zh_CN or en",
                ));
            }
            for channel in variants.names() {
                if self.channels.get(channel).is_none() {
                    return Err(RenderError::new(
                        format!("locales.{locale}.{channel}"),
                        "has no default variant to fall back to under `channels`",
                    ));
                }
            }
        }
        let compiled = CompiledTemplate::compile(self.clone(), 0)?;
        let samples = self.sample_variables();
        for (scope, variants) in self.scopes() {
            for (channel, variant) in variants.iter() {
                let account = variant.accounts().first().copied().unwrap_or_default();
                compiled.render_variant(scope, channel, variant, account, &samples)?;
            }
        }
        Ok(())
    }
}

/// A template version with every template string compiled: what the renderer caches.
#[derive(Debug)]
pub struct CompiledTemplate {
    pub definition: TemplateDefinition,
    pub version: i32,
    env: Environment<'static>,
}

impl CompiledTemplate {
    /// Compiles every template string and checks that each variable used is declared.
    pub fn compile(definition: TemplateDefinition, version: i32) -> Result<Self, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(auto_escape);
        // A runaway loop in a tenant's template fails its render instead of holding a
        // renderer thread; real templates use a few hundred instructions.
        env.set_fuel(Some(RENDER_FUEL));
        for (scope, variants) in definition.scopes() {
            for (channel, variant) in variants.iter() {
                variant.check().map_err(|(path, message)| {
                    RenderError::new(field_path(scope, channel, &path), message)
                })?;
                for (path, source) in variant.sources() {
                    let field = field_path(scope, channel, &path);
                    let name = template_name(scope, channel, &path);
                    env.add_template_owned(name.clone(), source.to_string())
                        .map_err(|e| RenderError::new(&field, describe_syntax(&e)))?;
                    let template = env
                        .get_template(&name)
                        .map_err(|e| RenderError::new(&field, e.to_string()))?;
                    let mut used: Vec<String> =
                        template.undeclared_variables(false).into_iter().collect();
                    used.sort();
                    if let Some(name) = used.iter().find(|n| {
                        !definition.variables.contains_key(n.as_str())
                            && !BUILTINS.contains(&n.as_str())
                    }) {
                        return Err(RenderError::new(
                            field,
                            format!("uses variable `{name}`, which the template does not declare"),
                        ));
                    }
                }
            }
        }
        Ok(Self {
            definition,
            version,
            env,
        })
    }

    /// Renders `channel`'s payload for a send from `account` in `locale` (empty: default).
    pub fn render(
        &self,
        channel: &str,
        account: &str,
        locale: &str,
        variables: &Map<String, Value>,
    ) -> Result<Value, RenderError> {
        self.definition.check_variables(variables)?;
        let (scope, name, variant) =
            self.definition
                .variant_for(channel, locale)
                .ok_or_else(|| {
                    RenderError::new("channels", format!("template has no `{channel}` variant"))
                })?;
        self.render_variant(scope, name, variant, account, variables)
    }

    /// Every channel's payload: the preview. `account_for(channel, accounts)` picks the
    /// provider account for channels whose variant names provider template ids.
    pub fn preview(
        &self,
        locale: &str,
        variables: &Map<String, Value>,
        account_for: impl Fn(&str, &[&str]) -> String,
    ) -> BTreeMap<&'static str, Result<Value, RenderError>> {
        self.definition
            .channel_names()
            .into_iter()
            .map(|channel| {
                let rendered = self
                    .definition
                    .variant_for(channel, locale)
                    .ok_or_else(|| RenderError::new("channels", "no variant"))
                    .and_then(|(scope, name, variant)| {
                        self.definition.check_variables(variables)?;
                        let account = account_for(channel, &variant.accounts());
                        self.render_variant(scope, name, variant, &account, variables)
                    });
                (channel, rendered)
            })
            .collect()
    }

    fn render_variant(
        &self,
        scope: &str,
        channel: &'static str,
        variant: &dyn Variant,
        account: &str,
        variables: &Map<String, Value>,
    ) -> Result<Value, RenderError> {
        let variables = normalize_numbers(variables);
        let fields = Fields {
            env: &self.env,
            scope,
            channel,
            account,
            context: minijinja::Value::from(minijinja::value::Serde(&variables)),
            variables: &variables,
        };
        variant.render(&fields)
    }
}

fn describe_syntax(error: &minijinja::Error) -> String {
    match error.line() {
        Some(line) => format!(
            "template syntax: {} (line {line})",
            error.detail().unwrap_or("invalid")
        ),
        None => format!("template syntax: {}", error.detail().unwrap_or("invalid")),
    }
}

/// What a variant renders with: its compiled templates and the request's variables.
pub(crate) struct Fields<'a> {
    env: &'a Environment<'static>,
    scope: &'a str,
    channel: &'static str,
    pub account: &'a str,
    context: minijinja::Value,
    variables: &'a Map<String, Value>,
}

impl Fields<'_> {
    /// Renders the template string at `path` of this variant.
    pub fn text(&self, path: &str) -> Result<String, RenderError> {
        let field = field_path(self.scope, self.channel, path);
        let template = self
            .env
            .get_template(&template_name(self.scope, self.channel, path))
            .map_err(|e| RenderError::new(&field, e.to_string()))?;
        template.render(&self.context).map_err(|error| {
            if error.kind() == minijinja::ErrorKind::UndefinedError {
                // minijinja does not say which name was undefined: the first one this template
                // uses that the request lacks is it.
                let mut missing: Vec<String> = template
                    .undeclared_variables(false)
                    .into_iter()
                    .filter(|name| !self.variables.contains_key(name))
                    .collect();
                missing.sort();
                if let Some(name) = missing.first() {
                    return RenderError::new(
                        format!("variables.{name}"),
                        format!("not given, but {field} uses it"),
                    );
                }
            }
            RenderError::new(
                field,
                format!("{}: {}", error.kind(), error.detail().unwrap_or_default()),
            )
        })
    }

    /// An error about the field at `path` of this variant.
    pub fn error(&self, path: &str, message: impl Into<String>) -> RenderError {
        RenderError::new(field_path(self.scope, self.channel, path), message)
    }
}

#[cfg(test)]
mod tests;
