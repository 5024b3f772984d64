//! One variant per channel: what a template file says for that channel, and how it renders
//! into the body that channel's provider API takes (the sender adds only the recipient and
//! its own ids, so issue #7's senders can pass the payload through).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::fields::{self, type_of_key};
use super::{Fields, RenderError};

// The channel names senders route on are the contract's.
pub const WECHAT_TEMPLATE: &str = herald_contract::channels::WECHAT_TEMPLATE;
pub const WECHAT_SUBSCRIBE: &str = herald_contract::channels::WECHAT_SUBSCRIBE;
pub const WECOM: &str = herald_contract::channels::WECOM;
pub const DINGTALK: &str = herald_contract::channels::DINGTALK;
pub const FEISHU: &str = herald_contract::channels::FEISHU;
pub const EMAIL: &str = herald_contract::channels::EMAIL;
pub const SMS: &str = herald_contract::channels::SMS;
pub const WEBHOOK: &str = "webhook";

/// Every channel a template may have a variant for.
pub const TEMPLATE_CHANNELS: &[&str] = &[
    WECHAT_TEMPLATE,
    WECHAT_SUBSCRIBE,
    WECOM,
    DINGTALK,
    FEISHU,
    EMAIL,
    SMS,
    WEBHOOK,
];

/// WeCom: text ≤ 2048 bytes, markdown ≤ 4096 bytes (over → 40058); textcard title ≤ 128
/// bytes, description ≤ 512 bytes, button text ≤ 4 characters.
const WECOM_TEXT_BYTES: usize = 2048;
const WECOM_MARKDOWN_BYTES: usize = 4096;
const WECOM_CARD_TITLE_BYTES: usize = 128;
const WECOM_CARD_DESCRIPTION_BYTES: usize = 512;
const WECOM_CARD_BUTTON_CHARS: usize = 4;
/// DingTalk robots: the commonly cited 20,000-byte message limit (not in DingTalk's docs).
const DINGTALK_BYTES: usize = 20_000;
/// Feishu robots: request body ≤ 20 KB.
const FEISHU_BYTES: usize = 20 * 1024;
/// SMS (Aliyun): a long message is at most 500 characters; a template parameter at most 35.
const SMS_TEXT_CHARS: usize = 500;
const SMS_PARAM_CHARS: usize = 35;
/// E-mail: RFC 5322 caps a header line at 998 characters.
const EMAIL_SUBJECT_CHARS: usize = 998;
/// Our own webhooks: the ingress's own body limit.
const WEBHOOK_BYTES: usize = 256 * 1024;

/// What a variant is: template strings with their paths, static checks, rendering.
pub(crate) trait Variant {
    /// Every template string, with its path inside the variant (`data.thing1.value`).
    fn sources(&self) -> Vec<(String, &str)>;
    /// Checks that need no variables (required fields, key names, colours).
    fn check(&self) -> Result<(), (String, String)> {
        Ok(())
    }
    /// Provider accounts the variant has a provider template id for (none: any account).
    fn accounts(&self) -> Vec<&str> {
        Vec::new()
    }
    /// The provider payload.
    fn render(&self, fields: &Fields<'_>) -> Result<Value, RenderError>;
}

/// The variants of one locale (or the default), by channel name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variants {
    #[serde(
        rename = "wechat.template",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub wechat_template: Option<WechatTemplate>,
    #[serde(
        rename = "wechat.subscribe",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub wechat_subscribe: Option<WechatSubscribe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wecom: Option<Wecom>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dingtalk: Option<Dingtalk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feishu: Option<Feishu>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<Email>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms: Option<Sms>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

impl Variants {
    /// The variants present, in `TEMPLATE_CHANNELS` order.
    pub(crate) fn iter(&self) -> Vec<(&'static str, &dyn Variant)> {
        let all: [(&'static str, Option<&dyn Variant>); 8] = [
            (
                WECHAT_TEMPLATE,
                self.wechat_template.as_ref().map(|v| v as &dyn Variant),
            ),
            (
                WECHAT_SUBSCRIBE,
                self.wechat_subscribe.as_ref().map(|v| v as &dyn Variant),
            ),
            (WECOM, self.wecom.as_ref().map(|v| v as &dyn Variant)),
            (DINGTALK, self.dingtalk.as_ref().map(|v| v as &dyn Variant)),
            (FEISHU, self.feishu.as_ref().map(|v| v as &dyn Variant)),
            (EMAIL, self.email.as_ref().map(|v| v as &dyn Variant)),
            (SMS, self.sms.as_ref().map(|v| v as &dyn Variant)),
            (WEBHOOK, self.webhook.as_ref().map(|v| v as &dyn Variant)),
        ];
        all.into_iter()
            .filter_map(|(name, variant)| variant.map(|v| (name, v)))
            .collect()
    }

    pub(crate) fn get(&self, channel: &str) -> Option<(&'static str, &dyn Variant)> {
        self.iter().into_iter().find(|(name, _)| *name == channel)
    }

    /// Channel names present.
    pub fn names(&self) -> Vec<&'static str> {
        self.iter().into_iter().map(|(name, _)| name).collect()
    }
}

fn max_bytes(
    fields: &Fields<'_>,
    path: &str,
    value: &str,
    max: usize,
    what: &str,
) -> Result<(), RenderError> {
    if value.len() > max {
        return Err(fields.error(
            path,
            format!("is {} bytes; {what} allows at most {max}", value.len()),
        ));
    }
    Ok(())
}

fn max_chars(
    fields: &Fields<'_>,
    path: &str,
    value: &str,
    max: usize,
    what: &str,
) -> Result<(), RenderError> {
    let n = value.chars().count();
    if n > max {
        return Err(fields.error(
            path,
            format!("is {n} characters; {what} allows at most {max}"),
        ));
    }
    Ok(())
}

fn max_json_bytes(
    fields: &Fields<'_>,
    payload: &Value,
    max: usize,
    what: &str,
) -> Result<(), RenderError> {
    let n = serde_json::to_vec(payload).map(|b| b.len()).unwrap_or(0);
    if n > max {
        return Err(fields.error(
            "",
            format!("renders to a {n}-byte body; {what} allows at most {max}"),
        ));
    }
    Ok(())
}

fn required(path: &str, value: &str) -> Result<(), (String, String)> {
    if value.trim().is_empty() {
        return Err((path.into(), "required".into()));
    }
    Ok(())
}

fn template_id<'a>(
    fields: &Fields<'_>,
    ids: &'a BTreeMap<String, String>,
) -> Result<&'a str, RenderError> {
    ids.get(fields.account).map(String::as_str).ok_or_else(|| {
        fields.error(
            "template_ids",
            format!(
                "no provider template id for account `{}` (has: {})",
                fields.account,
                ids.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

/// Template strings anywhere in a JSON tree (webhook bodies, Feishu post content).
fn tree_sources<'a>(prefix: String, value: &'a Value, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::String(text) => out.push((prefix, text)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                tree_sources(format!("{prefix}[{i}]"), item, out);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                tree_sources(format!("{prefix}.{key}"), item, out);
            }
        }
        _ => {}
    }
}

/// The tree with every string rendered (numbers, booleans and structure stay as they are).
fn render_tree(fields: &Fields<'_>, prefix: String, value: &Value) -> Result<Value, RenderError> {
    Ok(match value {
        Value::String(_) => Value::String(fields.text(&prefix)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| render_tree(fields, format!("{prefix}[{i}]"), item))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, item)| {
                    Ok((
                        key.clone(),
                        render_tree(fields, format!("{prefix}.{key}"), item)?,
                    ))
                })
                .collect::<Result<_, RenderError>>()?,
        ),
        other => other.clone(),
    })
}

fn valid_color(color: &str) -> bool {
    color.len() == 7 && color.starts_with('#') && color[1..].chars().all(|c| c.is_ascii_hexdigit())
}

/// A mini program page to open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Miniprogram {
    pub appid: String,
    #[serde(default)]
    pub pagepath: String,
}

/// One `data` entry of a WeChat template message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WechatField {
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
}

/// `wechat.template`: Official Account template message (`/cgi-bin/message/template/send`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WechatTemplate {
    /// WeChat's template id per provider account (dev and prod differ by account, not code).
    pub template_ids: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miniprogram: Option<Miniprogram>,
    pub data: BTreeMap<String, WechatField>,
}

impl Variant for WechatTemplate {
    fn sources(&self) -> Vec<(String, &str)> {
        let mut out: Vec<(String, &str)> = self
            .data
            .iter()
            .map(|(key, field)| (format!("data.{key}.value"), field.value.as_str()))
            .collect();
        if let Some(url) = &self.url {
            out.push(("url".into(), url));
        }
        if let Some(mp) = &self.miniprogram {
            out.push(("miniprogram.pagepath".into(), &mp.pagepath));
        }
        out
    }

    fn check(&self) -> Result<(), (String, String)> {
        if self.template_ids.is_empty() {
            return Err((
                "template_ids".into(),
                "at least one account is required".into(),
            ));
        }
        if self.data.is_empty() {
            return Err(("data".into(), "at least one field is required".into()));
        }
        for (key, field) in &self.data {
            if let Some(color) = &field.color
                && !valid_color(color)
            {
                return Err((
                    format!("data.{key}.color"),
                    format!("`{color}` is not a colour like #173177"),
                ));
            }
        }
        Ok(())
    }

    fn accounts(&self) -> Vec<&str> {
        self.template_ids.keys().map(String::as_str).collect()
    }

    fn render(&self, fields: &Fields<'_>) -> Result<Value, RenderError> {
        let mut data = Map::new();
        for (key, field) in &self.data {
            let path = format!("data.{key}.value");
            // Values stay plain values: rendered as text, never markup.
            let value = fields.text(&path)?;
            // Template messages with typed keys (`thing1`) follow the subscribe rules.
            if let Some(kind) = type_of_key(key) {
                fields::check(kind, &value).map_err(|m| fields.error(&path, m))?;
            }
            let mut entry = json!({ "value": value });
            if let Some(color) = &field.color {
                entry["color"] = Value::String(color.clone());
            }
            data.insert(key.clone(), entry);
        }
        let mut payload = json!({
            "template_id": template_id(fields, &self.template_ids)?,
            "data": data,
        });
        if self.url.is_some() {
            payload["url"] = Value::String(fields.text("url")?);
        }
        if let Some(mp) = &self.miniprogram {
            payload["miniprogram"] = json!({
                "appid": mp.appid,
                "pagepath": fields.text("miniprogram.pagepath")?,
            });
        }
        Ok(payload)
    }
}

/// One `data` entry of a subscribe message; its key names its type (`thing1`, `time2`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeField {
    pub value: String,
}

/// `wechat.subscribe`: subscribe message (`/cgi-bin/message/subscribe/bizsend` for an Official
/// Account, `/cgi-bin/message/subscribe/send` for a mini program).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WechatSubscribe {
    pub template_ids: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miniprogram: Option<Miniprogram>,
    /// `developer`, `trial` or `formal` (mini program sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miniprogram_state: Option<String>,
    /// `zh_CN`, `en_US`, `zh_HK` or `zh_TW` (mini program sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    pub data: BTreeMap<String, SubscribeField>,
}

impl Variant for WechatSubscribe {
    fn sources(&self) -> Vec<(String, &str)> {
        let mut out: Vec<(String, &str)> = self
            .data
            .iter()
            .map(|(key, field)| (format!("data.{key}.value"), field.value.as_str()))
            .collect();
        if let Some(page) = &self.page {
            out.push(("page".into(), page));
        }
        if let Some(mp) = &self.miniprogram {
            out.push(("miniprogram.pagepath".into(), &mp.pagepath));
        }
        out
    }

    fn check(&self) -> Result<(), (String, String)> {
        if self.template_ids.is_empty() {
            return Err((
                "template_ids".into(),
                "at least one account is required".into(),
            ));
        }
        if self.data.is_empty() {
            return Err(("data".into(), "at least one field is required".into()));
        }
        for key in self.data.keys() {
            if type_of_key(key).is_none() {
                return Err((
                    format!("data.{key}"),
                    format!(
                        "not a subscribe message key: a type ({}) followed by digits, e.g. thing1",
                        fields::type_names()
                    ),
                ));
            }
        }
        if let Some(state) = &self.miniprogram_state
            && !["developer", "trial", "formal"].contains(&state.as_str())
        {
            return Err((
                "miniprogram_state".into(),
                format!("`{state}` is not one of developer, trial, formal"),
            ));
        }
        if let Some(lang) = &self.lang
            && !["zh_CN", "en_US", "zh_HK", "zh_TW"].contains(&lang.as_str())
        {
            return Err((
                "lang".into(),
                format!("`{lang}` is not one of zh_CN, en_US, zh_HK, zh_TW"),
            ));
        }
        Ok(())
    }

    fn accounts(&self) -> Vec<&str> {
        self.template_ids.keys().map(String::as_str).collect()
    }

    fn render(&self, fields: &Fields<'_>) -> Result<Value, RenderError> {
        let mut data = Map::new();
        for key in self.data.keys() {
            let path = format!("data.{key}.value");
            let value = fields.text(&path)?;
            if let Some(kind) = type_of_key(key) {
                fields::check(kind, &value).map_err(|m| fields.error(&path, m))?;
            }
            data.insert(key.clone(), json!({ "value": value }));
        }
        let mut payload = json!({
            "template_id": template_id(fields, &self.template_ids)?,
            "data": data,
        });
        if self.page.is_some() {
            payload["page"] = Value::String(fields.text("page")?);
        }
        if let Some(mp) = &self.miniprogram {
            payload["miniprogram"] = json!({
                "appid": mp.appid,
                "pagepath": fields.text("miniprogram.pagepath")?,
            });
        }
        if let Some(state) = &self.miniprogram_state {
            payload["miniprogram_state"] = Value::String(state.clone());
        }
        if let Some(lang) = &self.lang {
            payload["lang"] = Value::String(lang.clone());
        }
        Ok(payload)
    }
}

/// `wecom`: a WeCom application message (`/cgi-bin/message/send`); text and markdown are
/// also what a group robot (`/cgi-bin/webhook/send`) takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msgtype", rename_all = "lowercase", deny_unknown_fields)]
pub enum Wecom {
    Text {
        content: String,
    },
    Markdown {
        content: String,
    },
    Textcard {
        title: String,
        description: String,
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        btntxt: Option<String>,
    },
}

impl Variant for Wecom {
    fn sources(&self) -> Vec<(String, &str)> {
        match self {
            Wecom::Text { content } | Wecom::Markdown { content } => {
                vec![("content".into(), content.as_str())]
            }
            Wecom::Textcard {
                title,
                description,
                url,
                btntxt,
            } => {
                let mut out = vec![
                    ("title".to_string(), title.as_str()),
                    ("description".to_string(), description.as_str()),
                    ("url".to_string(), url.as_str()),
                ];
                if let Some(b) = btntxt {
                    out.push(("btntxt".into(), b));
                }
                out
            }
        }
    }

    fn check(&self) -> Result<(), (String, String)> {
        match self {
            Wecom::Text { content } | Wecom::Markdown { content } => required("content", content),
            Wecom::Textcard {
                title,
                description,
                url,
                ..
            } => {
                required("title", title)?;
                required("description", description)?;
                required("url", url)
            }
        }
    }

    fn render(&self, fields: &Fields<'_>) -> Result<Value, RenderError> {
        match self {
            Wecom::Text { .. } => {
                let content = fields.text("content")?;
                max_bytes(fields, "content", &content, WECOM_TEXT_BYTES, "WeCom text")?;
                Ok(json!({"msgtype": "text", "text": {"content": content}}))
            }
            Wecom::Markdown { .. } => {
                let content = fields.text("content")?;
                max_bytes(
                    fields,
                    "content",
                    &content,
                    WECOM_MARKDOWN_BYTES,
                    "WeCom markdown",
                )?;
                Ok(json!({"msgtype": "markdown", "markdown": {"content": content}}))
            }
            Wecom::Textcard { btntxt, .. } => {
                let title = fields.text("title")?;
                max_bytes(
                    fields,
                    "title",
                    &title,
                    WECOM_CARD_TITLE_BYTES,
                    "a WeCom textcard title",
                )?;
                let description = fields.text("description")?;
                max_bytes(
                    fields,
                    "description",
                    &description,
                    WECOM_CARD_DESCRIPTION_BYTES,
                    "a WeCom textcard description",
                )?;
                let mut card = json!({
                    "title": title,
                    "description": description,
                    "url": fields.text("url")?,
                });
                if btntxt.is_some() {
                    let button = fields.text("btntxt")?;
                    max_chars(
                        fields,
                        "btntxt",
                        &button,
                        WECOM_CARD_BUTTON_CHARS,
                        "a WeCom textcard button",
                    )?;
                    card["btntxt"] = Value::String(button);
                }
                Ok(json!({"msgtype": "textcard", "textcard": card}))
            }
        }
    }
}

/// Who a DingTalk robot message mentions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DingtalkAt {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub at_mobiles: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub at_user_ids: Vec<String>,
    #[serde(default)]
    pub is_at_all: bool,
}

impl DingtalkAt {
    fn to_json(&self) -> Value {
        json!({
            "atMobiles": self.at_mobiles,
            "atUserIds": self.at_user_ids,
            "isAtAll": self.is_at_all,
        })
    }
}

/// A button of a DingTalk action card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DingtalkButton {
    pub title: String,
    pub action_url: String,
}

/// `dingtalk`: a DingTalk custom robot message (`/robot/send`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msgtype", deny_unknown_fields)]
pub enum Dingtalk {
    #[serde(rename = "text")]
    Text {
        content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<DingtalkAt>,
    },
    #[serde(rename = "markdown")]
    Markdown {
        title: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<DingtalkAt>,
    },
    /// One whole-card button (`single_title` + `single_url`) or several `btns`.
    #[serde(rename = "actionCard")]
    ActionCard {
        title: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        single_title: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        single_url: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        btns: Vec<DingtalkButton>,
        /// `0` vertical, `1` horizontal.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        btn_orientation: Option<String>,
    },
}

impl Variant for Dingtalk {
    fn sources(&self) -> Vec<(String, &str)> {
        match self {
            Dingtalk::Text { content, .. } => vec![("content".into(), content.as_str())],
            Dingtalk::Markdown { title, text, .. } => vec![
                ("title".into(), title.as_str()),
                ("text".into(), text.as_str()),
            ],
            Dingtalk::ActionCard {
                title,
                text,
                single_title,
                single_url,
                btns,
                ..
            } => {
                let mut out = vec![
                    ("title".to_string(), title.as_str()),
                    ("text".to_string(), text.as_str()),
                ];
                if let Some(s) = single_title {
                    out.push(("single_title".into(), s));
                }
                if let Some(s) = single_url {
                    out.push(("single_url".into(), s));
                }
                for (i, b) in btns.iter().enumerate() {
                    out.push((format!("btns[{i}].title"), &b.title));
                    out.push((format!("btns[{i}].action_url"), &b.action_url));
                }
                out
            }
        }
    }

    fn check(&self) -> Result<(), (String, String)> {
        match self {
            Dingtalk::Text { content, .. } => required("content", content),
            Dingtalk::Markdown { title, text, .. } => {
                required("title", title)?;
                required("text", text)
            }
            Dingtalk::ActionCard {
                title,
                text,
                single_title,
                single_url,
                btns,
                btn_orientation,
            } => {
                required("title", title)?;
                required("text", text)?;
                let single = single_title.is_some() || single_url.is_some();
                if single && !btns.is_empty() {
                    return Err((
                        "btns".into(),
                        "give either single_title and single_url, or btns".into(),
                    ));
                }
                if single && (single_title.is_none() || single_url.is_none()) {
                    return Err((
                        "single_url".into(),
                        "single_title and single_url go together".into(),
                    ));
                }
                if !single && btns.is_empty() {
                    return Err((
                        "btns".into(),
                        "an action card needs single_title and single_url, or btns".into(),
                    ));
                }
                if let Some(o) = btn_orientation
                    && o != "0"
                    && o != "1"
                {
                    return Err(("btn_orientation".into(), "must be \"0\" or \"1\"".into()));
                }
                Ok(())
            }
        }
    }

    fn render(&self, fields: &Fields<'_>) -> Result<Value, RenderError> {
        let (mut payload, at) = match self {
            Dingtalk::Text { at, .. } => (
                json!({"msgtype": "text", "text": {"content": fields.text("content")?}}),
                at,
            ),
            Dingtalk::Markdown { at, .. } => (
                json!({"msgtype": "markdown", "markdown": {
                    "title": fields.text("title")?,
                    "text": fields.text("text")?,
                }}),
                at,
            ),
            Dingtalk::ActionCard {
                single_title,
                btns,
                btn_orientation,
                ..
            } => {
                let mut card = json!({
                    "title": fields.text("title")?,
                    "text": fields.text("text")?,
                });
                if single_title.is_some() {
                    card["singleTitle"] = Value::String(fields.text("single_title")?);
                    card["singleURL"] = Value::String(fields.text("single_url")?);
                }
                if !btns.is_empty() {
                    let rendered: Vec<Value> = (0..btns.len())
                        .map(|i| {
                            Ok(json!({
                                "title": fields.text(&format!("btns[{i}].title"))?,
                                "actionURL": fields.text(&format!("btns[{i}].action_url"))?,
                            }))
                        })
                        .collect::<Result<_, RenderError>>()?;
                    card["btns"] = Value::Array(rendered);
                }
                if let Some(o) = btn_orientation {
                    card["btnOrientation"] = Value::String(o.clone());
                }
                (json!({"msgtype": "actionCard", "actionCard": card}), &None)
            }
        };
        if let Some(at) = at {
            payload["at"] = at.to_json();
        }
        max_json_bytes(fields, &payload, DINGTALK_BYTES, "a DingTalk robot message")?;
        Ok(payload)
    }
}

fn zh_cn() -> String {
    "zh_cn".into()
}

/// `feishu`: a Feishu/Lark custom robot message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg_type", deny_unknown_fields)]
pub enum Feishu {
    #[serde(rename = "text")]
    Text { text: String },
    /// Rich text: `content` is a list of lines, each a list of elements such as
    /// `{tag: text, text: ...}` or `{tag: a, text: ..., href: ...}`; every string is a template.
    #[serde(rename = "post")]
    Post {
        #[serde(default = "zh_cn")]
        lang: String,
        title: String,
        content: Vec<Vec<Map<String, Value>>>,
    },
}

impl Variant for Feishu {
    fn sources(&self) -> Vec<(String, &str)> {
        match self {
            Feishu::Text { text } => vec![("text".into(), text.as_str())],
            Feishu::Post { title, content, .. } => {
                let mut out = vec![("title".to_string(), title.as_str())];
                for (i, line) in content.iter().enumerate() {
                    for (j, element) in line.iter().enumerate() {
                        for (key, value) in element {
                            tree_sources(format!("content[{i}][{j}].{key}"), value, &mut out);
                        }
                    }
                }
                out
            }
        }
    }

    fn check(&self) -> Result<(), (String, String)> {
        match self {
            Feishu::Text { text } => required("text", text),
            Feishu::Post {
                lang,
                title,
                content,
            } => {
                if !["zh_cn", "en_us", "ja_jp"].contains(&lang.as_str()) {
                    return Err((
                        "lang".into(),
                        format!("`{lang}` is not one of zh_cn, en_us, ja_jp"),
                    ));
                }
                required("title", title)?;
                for (i, line) in content.iter().enumerate() {
                    for (j, element) in line.iter().enumerate() {
                        if !element.get("tag").is_some_and(Value::is_string) {
                            return Err((
                                format!("content[{i}][{j}].tag"),
                                "required (text, a, at, img)".into(),
                            ));
                        }
                    }
                }
                Ok(())
            }
        }
    }

    fn render(&self, fields: &Fields<'_>) -> Result<Value, RenderError> {
        let payload = match self {
            Feishu::Text { .. } => {
                json!({"msg_type": "text", "content": {"text": fields.text("text")?}})
            }
            Feishu::Post { lang, content, .. } => {
                let mut lines = Vec::with_capacity(content.len());
                for (i, line) in content.iter().enumerate() {
                    let mut elements = Vec::with_capacity(line.len());
                    for (j, element) in line.iter().enumerate() {
                        let mut rendered = Map::new();
                        for (key, value) in element {
                            let path = format!("content[{i}][{j}].{key}");
                            rendered.insert(key.clone(), render_tree(fields, path, value)?);
                        }
                        elements.push(Value::Object(rendered));
                    }
                    lines.push(Value::Array(elements));
                }
                let mut post = Map::new();
                post.insert(
                    lang.clone(),
                    json!({"title": fields.text("title")?, "content": lines}),
                );
                json!({"msg_type": "post", "content": {"post": post}})
            }
        };
        max_json_bytes(fields, &payload, FEISHU_BYTES, "a Feishu robot message")?;
        Ok(payload)
    }
}

/// `email`: subject, and an HTML body (auto-escaped), a text body, or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Email {
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Variant for Email {
    fn sources(&self) -> Vec<(String, &str)> {
        let mut out = vec![("subject".to_string(), self.subject.as_str())];
        if let Some(html) = &self.html {
            // The `html` path is what switches on HTML auto-escaping (see `auto_escape`).
            out.push(("html".into(), html));
        }
        if let Some(text) = &self.text {
            out.push(("text".into(), text));
        }
        out
    }

    fn check(&self) -> Result<(), (String, String)> {
        required("subject", &self.subject)?;
        if self.html.is_none() && self.text.is_none() {
            return Err(("html".into(), "give html, text or both".into()));
        }
        Ok(())
    }

    fn render(&self, fields: &Fields<'_>) -> Result<Value, RenderError> {
        let subject = fields.text("subject")?;
        // A line break in a header would let a variable add headers of its own.
        if subject.contains(['\r', '\n']) {
            return Err(fields.error("subject", "must be one line"));
        }
        max_chars(
            fields,
            "subject",
            &subject,
            EMAIL_SUBJECT_CHARS,
            "an e-mail subject",
        )?;
        let mut payload = json!({ "subject": subject });
        if self.html.is_some() {
            payload["html"] = Value::String(fields.text("html")?);
        }
        if self.text.is_some() {
            payload["text"] = Value::String(fields.text("text")?);
        }
        Ok(payload)
    }
}

/// `sms`: a provider template (its id per account, and parameters), or plain text.
///
/// Parameters are named (a map: Aliyun's `${name}`) or positional (a list: Tencent Cloud's
/// `{1}`, `{2}`, …); the sender of each provider takes the form its API does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sms {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub template_ids: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "SmsParams::is_empty")]
    pub params: SmsParams,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// An SMS template's parameters: named (Aliyun) or in order (Tencent Cloud).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SmsParams {
    Named(BTreeMap<String, String>),
    Positional(Vec<String>),
}

impl Default for SmsParams {
    fn default() -> Self {
        SmsParams::Named(BTreeMap::new())
    }
}

impl SmsParams {
    pub fn is_empty(&self) -> bool {
        match self {
            SmsParams::Named(map) => map.is_empty(),
            SmsParams::Positional(list) => list.is_empty(),
        }
    }

    /// `(path, template)` of every parameter.
    fn entries(&self) -> Vec<(String, &str)> {
        match self {
            SmsParams::Named(map) => map
                .iter()
                .map(|(key, value)| (format!("params.{key}"), value.as_str()))
                .collect(),
            SmsParams::Positional(list) => list
                .iter()
                .enumerate()
                .map(|(i, value)| (format!("params[{i}]"), value.as_str()))
                .collect(),
        }
    }
}

impl Variant for Sms {
    fn sources(&self) -> Vec<(String, &str)> {
        let mut out = self.params.entries();
        if let Some(text) = &self.text {
            out.push(("text".into(), text));
        }
        out
    }

    fn check(&self) -> Result<(), (String, String)> {
        match (self.template_ids.is_empty(), &self.text) {
            (false, None) => Ok(()),
            (true, Some(text)) if self.params.is_empty() => required("text", text),
            (true, Some(_)) => Err((
                "params".into(),
                "params belong to a provider template (template_ids)".into(),
            )),
            (false, Some(_)) => Err((
                "text".into(),
                "give either template_ids with params, or text".into(),
            )),
            (true, None) => Err((
                "template_ids".into(),
                "give either template_ids with params, or text".into(),
            )),
        }
    }

    fn accounts(&self) -> Vec<&str> {
        self.template_ids.keys().map(String::as_str).collect()
    }

    fn render(&self, fields: &Fields<'_>) -> Result<Value, RenderError> {
        if self.text.is_some() {
            let text = fields.text("text")?;
            max_chars(fields, "text", &text, SMS_TEXT_CHARS, "an SMS")?;
            return Ok(json!({ "text": text }));
        }
        let param = |path: &str| -> Result<Value, RenderError> {
            let value = fields.text(path)?;
            max_chars(
                fields,
                path,
                &value,
                SMS_PARAM_CHARS,
                "an SMS template parameter",
            )?;
            Ok(Value::String(value))
        };
        let params = match &self.params {
            SmsParams::Named(map) => {
                let mut params = Map::new();
                for key in map.keys() {
                    params.insert(key.clone(), param(&format!("params.{key}"))?);
                }
                Value::Object(params)
            }
            SmsParams::Positional(list) => Value::Array(
                (0..list.len())
                    .map(|i| param(&format!("params[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(json!({
            "template_id": template_id(fields, &self.template_ids)?,
            "params": params,
        }))
    }
}

/// `webhook`: the JSON body to POST; every string in it is a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub body: Map<String, Value>,
}

impl Variant for Webhook {
    fn sources(&self) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        for (key, value) in &self.body {
            tree_sources(format!("body.{key}"), value, &mut out);
        }
        out
    }

    fn render(&self, fields: &Fields<'_>) -> Result<Value, RenderError> {
        let mut body = Map::new();
        for (key, value) in &self.body {
            body.insert(
                key.clone(),
                render_tree(fields, format!("body.{key}"), value)?,
            );
        }
        let body = Value::Object(body);
        max_json_bytes(fields, &body, WEBHOOK_BYTES, "a webhook body")?;
        Ok(body)
    }
}
