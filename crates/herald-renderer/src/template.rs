//! Template definitions and strict rendering.
//!
//! A definition (stored as JSON in Postgres, one immutable row per version) declares its
//! variables and one variant per channel. Rendering is strict: a missing or mistyped variable
//! is a permanent rejection that names the variable, never a blank field.

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateDefinition {
    pub id: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub variables: BTreeMap<String, VariableSpec>,
    /// Variants by channel name.
    pub channels: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariableSpec {
    #[serde(rename = "type", default)]
    pub kind: VariableType,
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VariableType {
    #[default]
    String,
    Number,
    Boolean,
}

/// The WeChat template message variant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WechatTemplateVariant {
    /// WeChat's template id per provider account (dev and prod differ by account, not code).
    pub template_ids: BTreeMap<String, String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub miniprogram: Option<Miniprogram>,
    pub data: BTreeMap<String, WechatField>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Miniprogram {
    pub appid: String,
    #[serde(default)]
    pub pagepath: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WechatField {
    pub value: String,
    #[serde(default)]
    pub color: Option<String>,
}

/// Why a request cannot be rendered; always permanent.
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

impl TemplateDefinition {
    /// Checks the request's variables against the declaration.
    pub fn check_variables(&self, variables: &Map<String, Value>) -> Result<(), RenderError> {
        for (name, spec) in &self.variables {
            let field = format!("variables.{name}");
            match variables.get(name) {
                None | Some(Value::Null) if spec.required => {
                    return Err(RenderError::new(field, "required by the template"));
                }
                None | Some(Value::Null) => {}
                Some(value) => {
                    let ok = match spec.kind {
                        VariableType::String => value.is_string(),
                        VariableType::Number => value.is_number(),
                        VariableType::Boolean => value.is_boolean(),
                    };
                    if !ok {
                        return Err(RenderError::new(
                            field,
                            format!("must be a {:?}", spec.kind).to_lowercase(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Renders the WeChat template payload (`template_id`, `url`/`miniprogram`, `data`) for
    /// the given provider account.
    pub fn render_wechat_template(
        &self,
        account: &str,
        variables: &Map<String, Value>,
    ) -> Result<Value, RenderError> {
        let channel = herald_contract::channels::WECHAT_TEMPLATE;
        let raw = self.channels.get(channel).ok_or_else(|| {
            RenderError::new("channels", format!("template has no `{channel}` variant"))
        })?;
        let variant: WechatTemplateVariant = serde_json::from_value(raw.clone())
            .map_err(|e| RenderError::new(format!("template.{channel}"), e.to_string()))?;
        let template_id = variant.template_ids.get(account).ok_or_else(|| {
            RenderError::new(
                format!("template.{channel}.template_ids"),
                format!("no WeChat template id for account `{account}`"),
            )
        })?;
        let env = text_environment();
        let context = minijinja::Value::from(minijinja::value::Serde(variables));
        let render = |field: &str, source: &str| -> Result<String, RenderError> {
            env.render_str(source, &context)
                .map_err(|e| RenderError::new(field.to_string(), describe(&e, variables)))
        };
        let mut data = Map::new();
        for (key, field) in &variant.data {
            // WeChat data values stay plain values: rendered as text, never markup.
            let value = render(&format!("data.{key}"), &field.value)?;
            let mut entry = json!({ "value": value });
            if let Some(color) = &field.color {
                entry["color"] = Value::String(color.clone());
            }
            data.insert(key.clone(), entry);
        }
        let mut payload = json!({ "template_id": template_id, "data": data });
        if let Some(url) = &variant.url {
            payload["url"] = Value::String(render("url", url)?);
        }
        if let Some(mp) = &variant.miniprogram {
            payload["miniprogram"] = json!({
                "appid": mp.appid,
                "pagepath": render("miniprogram.pagepath", &mp.pagepath)?,
            });
        }
        Ok(payload)
    }
}

fn text_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env
}

/// minijinja's undefined errors do not say which name; find the first referenced variable
/// the request lacks so the rejection names it.
fn describe(error: &minijinja::Error, variables: &Map<String, Value>) -> String {
    if error.kind() == minijinja::ErrorKind::UndefinedError
        && let Some(source) = error.template_source()
    {
        let env = text_environment();
        if let Ok(template) = env.template_from_str(source) {
            let mut missing: Vec<String> = template
                .undeclared_variables(false)
                .into_iter()
                .filter(|name| !variables.contains_key(name))
                .collect();
            missing.sort();
            if let Some(name) = missing.first() {
                return format!("uses variable `{name}`, which the request does not give");
            }
        }
    }
    error.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition() -> TemplateDefinition {
        serde_json::from_value(json!({
            "id": "order_shipped",
            "variables": {
                "order_id": {"type": "string", "required": true},
                "items": {"type": "number"}
            },
            "channels": {"wechat.template": {
                "template_ids": {"demo-oa": "tmpl_1"},
                "url": "https://shop.example/orders/{{ order_id }}",
                "data": {
                    "order_id": {"value": "{{ order_id }}", "color": "#173177"},
                    "note": {"value": "{{ note }}"}
                }
            }}
        }))
        .expect("definition")
    }

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn renders_values_as_plain_text() {
        let payload = definition()
            .render_wechat_template("demo-oa", &vars(json!({"order_id": "<A&1>", "note": "x"})))
            .expect("renders");
        assert_eq!(payload["template_id"], "tmpl_1");
        assert_eq!(payload["data"]["order_id"]["value"], "<A&1>");
        assert_eq!(payload["data"]["order_id"]["color"], "#173177");
        assert_eq!(payload["url"], "https://shop.example/orders/<A&1>");
    }

    #[test]
    fn missing_and_mistyped_variables_are_named() {
        let def = definition();
        let err = def.check_variables(&vars(json!({}))).expect_err("required");
        assert_eq!(err.field, "variables.order_id");
        let err = def
            .check_variables(&vars(json!({"order_id": "A", "items": "three"})))
            .expect_err("mistyped");
        assert_eq!(err.field, "variables.items");
        let err = def
            .render_wechat_template("demo-oa", &vars(json!({"order_id": "A"})))
            .expect_err("undeclared variable used by the variant");
        assert_eq!(err.field, "data.note");
        assert!(err.message.contains("`note`"), "{}", err.message);
    }

    #[test]
    fn unknown_account_is_a_template_config_error() {
        let err = definition()
            .render_wechat_template("prod-oa", &vars(json!({"order_id": "A", "note": "n"})))
            .expect_err("no template id");
        assert!(err.message.contains("prod-oa"));
    }
}
