//! WeChat (and WeCom) callback bodies: parsing, in XML or JSON, and normalisation into the
//! events the status projector applies.
//!
//! Nothing here authenticates: the receiver checks signatures (and decrypts) before a body
//! reaches [`parse`].

use herald_contract::Timestamp;
use herald_contract::v1::{DeliveryEvent, DeliveryState, RecipientEvent, TemplateConsent};
use serde::Deserialize;

pub use crate::crypto::signature_matches;

/// `hex(sha1(sorted([token, timestamp, nonce]).join("")))`: the URL `signature`.
pub fn signature(token: &str, timestamp: &str, nonce: &str) -> String {
    crate::crypto::sha1_signature(&[token, timestamp, nonce])
}

/// The fields of a callback body this receiver reads. Every field is text: XML has nothing
/// else, and JSON bodies are brought to the same shape before decoding (see [`parse`]).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CallbackBody {
    #[serde(rename = "ToUserName", default)]
    pub to_user_name: String,
    #[serde(rename = "FromUserName", default)]
    pub from_user_name: String,
    #[serde(rename = "CreateTime", default)]
    pub create_time: String,
    #[serde(rename = "MsgType", default)]
    pub msg_type: String,
    #[serde(rename = "Event", default)]
    pub event: String,
    #[serde(rename = "MsgID", alias = "MsgId", default)]
    pub msg_id: String,
    #[serde(rename = "Status", default)]
    pub status: String,
    #[serde(rename = "SubscribeMsgSentEvent", default)]
    pub sent: Option<ItemList<SentItem>>,
    #[serde(rename = "SubscribeMsgPopupEvent", default)]
    pub popup: Option<ItemList<ConsentItem>>,
    #[serde(rename = "SubscribeMsgChangeEvent", default)]
    pub change: Option<ItemList<ConsentItem>>,
}

/// `<X><List>…</List><List>…</List></X>`, or `{"List": {…}}` / `{"List": [{…}, …]}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ItemList<T> {
    #[serde(rename = "List", default = "Vec::new")]
    pub list: Vec<T>,
}

/// One message of a `subscribe_msg_sent_event`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SentItem {
    #[serde(rename = "TemplateId", default)]
    pub template_id: String,
    #[serde(rename = "MsgID", alias = "MsgId", default)]
    pub msg_id: String,
    #[serde(rename = "ErrorCode", default)]
    pub error_code: String,
    #[serde(rename = "ErrorStatus", default)]
    pub error_status: String,
}

/// One template of a `subscribe_msg_popup_event` / `subscribe_msg_change_event`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConsentItem {
    #[serde(rename = "TemplateId", default)]
    pub template_id: String,
    #[serde(rename = "SubscribeStatusString", default)]
    pub status: String,
}

/// The envelope of an encrypted callback: only `Encrypt` is read, before the signature over it
/// is checked, so nothing else of an unauthenticated body is looked at.
#[derive(Debug, Default, Deserialize)]
struct Envelope {
    #[serde(rename = "Encrypt", default)]
    encrypt: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("document type declarations are not accepted")]
    Dtd,
    #[error("body is neither XML nor JSON")]
    UnknownFormat,
    #[error("malformed XML: {0}")]
    Xml(#[from] quick_xml::DeError),
    #[error("malformed JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no Encrypt element")]
    NoEncrypt,
}

enum Format {
    Xml,
    Json,
}

fn format_of(body: &[u8]) -> Result<Format, ParseError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'<') => {
            // quick-xml reads no DTD and expands no custom entity; refusing any declaration
            // outright also keeps entity tricks from ever reaching it.
            if body.windows(9).any(|w| {
                w.eq_ignore_ascii_case(b"<!DOCTYPE") || w.eq_ignore_ascii_case(b"<!ENTITY ")
            }) {
                return Err(ParseError::Dtd);
            }
            Ok(Format::Xml)
        }
        Some(b'{') => Ok(Format::Json),
        _ => Err(ParseError::UnknownFormat),
    }
}

/// The `Encrypt` of a safe/compatible-mode body, XML or JSON.
pub fn envelope_encrypt(body: &[u8]) -> Result<String, ParseError> {
    let envelope: Envelope = match format_of(body)? {
        Format::Xml => quick_xml::de::from_str(
            std::str::from_utf8(body).map_err(|_| ParseError::UnknownFormat)?,
        )?,
        Format::Json => serde_json::from_slice(body)?,
    };
    let encrypt = envelope.encrypt.trim().to_string();
    if encrypt.is_empty() {
        return Err(ParseError::NoEncrypt);
    }
    Ok(encrypt)
}

/// Parses a plain (or decrypted) callback body, XML or JSON.
pub fn parse(body: &[u8]) -> Result<CallbackBody, ParseError> {
    match format_of(body)? {
        Format::Xml => Ok(quick_xml::de::from_str(
            std::str::from_utf8(body).map_err(|_| ParseError::UnknownFormat)?,
        )?),
        Format::Json => {
            let mut value: serde_json::Value = serde_json::from_slice(body)?;
            for list_holder in [
                "SubscribeMsgSentEvent",
                "SubscribeMsgPopupEvent",
                "SubscribeMsgChangeEvent",
            ] {
                // In JSON, `List` is an object for one item and an array for several.
                if let Some(list) = value.get_mut(list_holder).and_then(|h| h.get_mut("List"))
                    && list.is_object()
                {
                    *list = serde_json::Value::Array(vec![list.take()]);
                }
            }
            stringify_scalars(&mut value);
            Ok(serde_json::from_value(value)?)
        }
    }
}

/// Numbers and booleans become their text, as XML would have them.
fn stringify_scalars(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) => *value = Value::String(n.to_string()),
        Value::Bool(b) => *value = Value::String(b.to_string()),
        Value::Array(items) => items.iter_mut().for_each(stringify_scalars),
        Value::Object(map) => map.values_mut().for_each(stringify_scalars),
        Value::Null | Value::String(_) => {}
    }
}

/// A callback made uniform, for the projector.
#[derive(Debug, Clone, PartialEq)]
pub enum Normalised {
    /// About a message Herald sent.
    Delivery(DeliveryEvent),
    /// About a recipient (follow state, subscription consent).
    Recipient(RecipientEvent),
}

impl Normalised {
    pub fn kind(&self) -> &str {
        match self {
            Normalised::Delivery(e) => &e.kind,
            Normalised::Recipient(e) => &e.kind,
        }
    }
}

fn occurred_at(body: &CallbackBody) -> Option<Timestamp> {
    body.create_time
        .trim()
        .parse()
        .ok()
        // Only what an RFC 3339 string can hold (years 1 to 9999): an event time outside it
        // has no canonical JSON, and the event would be published with an empty body.
        .filter(|seconds| (-62_135_596_800..=253_402_300_799).contains(seconds))
        .map(|seconds| Timestamp { seconds, nanos: 0 })
}

/// The events of a callback body; empty when it carries nothing Herald acts on (the receiver
/// acknowledges those and logs them).
pub fn normalise(provider: &str, account: &str, body: &CallbackBody) -> Vec<Normalised> {
    if body.msg_type != "event" {
        return Vec::new();
    }
    let occurred_at = occurred_at(body);
    let delivery = |msgid: &str, state: DeliveryState, provider_status: &str| {
        Normalised::Delivery(DeliveryEvent {
            // The same callback retried (WeChat tries 3 times) gets the same id.
            event_id: format!("{provider}:{account}:{msgid}:{}", body.event),
            provider: provider.into(),
            provider_account: account.into(),
            provider_msgid: msgid.into(),
            state: state as i32,
            provider_status: provider_status.into(),
            kind: body.event.clone(),
            occurred_at,
        })
    };
    let recipient = |consents: Vec<TemplateConsent>| {
        Normalised::Recipient(RecipientEvent {
            // Events without a MsgId are de-duplicated by FromUserName + CreateTime + Event.
            event_id: format!(
                "{provider}:{account}:{}:{}:{}",
                body.from_user_name, body.create_time, body.event
            ),
            provider: provider.into(),
            provider_account: account.into(),
            recipient: body.from_user_name.clone(),
            kind: body.event.clone(),
            consents,
            occurred_at,
        })
    };
    match body.event.as_str() {
        "TEMPLATESENDJOBFINISH" if !body.msg_id.is_empty() => {
            // `success`, `failed:user block`, `failed: system failed`, `failed:freq limit`.
            let state = if body.status.trim() == "success" {
                DeliveryState::Delivered
            } else {
                DeliveryState::Failed
            };
            vec![delivery(&body.msg_id, state, &body.status)]
        }
        "subscribe_msg_sent_event" => body
            .sent
            .iter()
            .flat_map(|sent| &sent.list)
            .filter(|item| !item.msg_id.is_empty())
            .map(|item| {
                let code = item.error_code.trim();
                let (state, status) = if code == "0" {
                    (DeliveryState::Delivered, item.error_status.clone())
                } else if item.error_status.is_empty() {
                    (DeliveryState::Failed, format!("errcode:{code}"))
                } else {
                    (DeliveryState::Failed, item.error_status.clone())
                };
                delivery(&item.msg_id, state, &status)
            })
            .collect(),
        "subscribe" | "unsubscribe" if !body.from_user_name.is_empty() => {
            vec![recipient(Vec::new())]
        }
        "subscribe_msg_popup_event" | "subscribe_msg_change_event"
            if !body.from_user_name.is_empty() =>
        {
            let items = if body.event == "subscribe_msg_popup_event" {
                &body.popup
            } else {
                &body.change
            };
            let consents: Vec<TemplateConsent> = items
                .iter()
                .flat_map(|l| &l.list)
                .filter(|item| !item.template_id.is_empty())
                .map(|item| TemplateConsent {
                    template_id: item.template_id.clone(),
                    status: item.status.clone(),
                })
                .collect();
            if consents.is_empty() {
                Vec::new()
            } else {
                vec![recipient(consents)]
            }
        }
        _ => Vec::new(),
    }
}

/// An openid (or any user id) shortened for logs: enough to tell users apart, not to name one.
pub fn mask(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 8 {
        return "***".into();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 2..].iter().collect();
    format!("{head}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(events: Vec<Normalised>) -> Normalised {
        assert_eq!(events.len(), 1, "{events:?}");
        events.into_iter().next().expect("one")
    }

    fn delivery(event: Normalised) -> DeliveryEvent {
        match event {
            Normalised::Delivery(e) => e,
            other => panic!("not a delivery event: {other:?}"),
        }
    }

    fn recipient(event: Normalised) -> RecipientEvent {
        match event {
            Normalised::Recipient(e) => e,
            other => panic!("not a recipient event: {other:?}"),
        }
    }

    fn job_finish(status: &str) -> String {
        format!(
            "<xml><ToUserName><![CDATA[gh_1]]></ToUserName><FromUserName><![CDATA[oUser]]></FromUserName>\
             <CreateTime>1700000000</CreateTime><MsgType><![CDATA[event]]></MsgType>\
             <Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>3000000000000000001</MsgID>\
             <Status><![CDATA[{status}]]></Status></xml>"
        )
    }

    #[test]
    fn every_template_send_job_finish_status_is_normalised() {
        for (status, state) in [
            ("success", DeliveryState::Delivered),
            ("failed:user block", DeliveryState::Failed),
            ("failed: system failed", DeliveryState::Failed),
            ("failed:freq limit", DeliveryState::Failed),
        ] {
            let body = parse(job_finish(status).as_bytes()).expect("parses");
            let event = delivery(only(normalise("wechat", "demo-oa", &body)));
            assert_eq!(event.provider_msgid, "3000000000000000001");
            assert_eq!(event.state(), state, "{status}");
            assert_eq!(event.provider_status, status);
            assert_eq!(event.kind, "TEMPLATESENDJOBFINISH");
            assert_eq!(
                event.event_id,
                "wechat:demo-oa:3000000000000000001:TEMPLATESENDJOBFINISH"
            );
            assert_eq!(event.occurred_at.map(|t| t.seconds), Some(1_700_000_000));
        }
    }

    #[test]
    fn subscribe_msg_sent_event_one_or_many_in_xml_and_json() {
        let xml_one = "<xml><ToUserName>gh_1</ToUserName><FromUserName>oUser0000000001</FromUserName>\
            <CreateTime>1620963428</CreateTime><MsgType>event</MsgType><Event>subscribe_msg_sent_event</Event>\
            <SubscribeMsgSentEvent><List><TemplateId>T1</TemplateId><MsgID>1700827132819554304</MsgID>\
            <ErrorCode>0</ErrorCode><ErrorStatus>success</ErrorStatus></List></SubscribeMsgSentEvent></xml>";
        let xml_many = "<xml><ToUserName>gh_1</ToUserName><FromUserName>oUser0000000001</FromUserName>\
            <CreateTime>1620963428</CreateTime><MsgType>event</MsgType><Event>subscribe_msg_sent_event</Event>\
            <SubscribeMsgSentEvent><List><TemplateId>T1</TemplateId><MsgID>11</MsgID>\
            <ErrorCode>0</ErrorCode><ErrorStatus>success</ErrorStatus></List>\
            <List><TemplateId>T2</TemplateId><MsgID>12</MsgID><ErrorCode>43101</ErrorCode>\
            <ErrorStatus>failed:user refuse</ErrorStatus></List></SubscribeMsgSentEvent></xml>";
        let json_one = r#"{"ToUserName":"gh_1","FromUserName":"oUser0000000001","CreateTime":1620963428,
            "MsgType":"event","Event":"subscribe_msg_sent_event",
            "SubscribeMsgSentEvent":{"List":{"TemplateId":"T1","MsgID":"1700827132819554304","ErrorCode":0,"ErrorStatus":"success"}}}"#;
        let json_many = r#"{"ToUserName":"gh_1","FromUserName":"oUser0000000001","CreateTime":1620963428,
            "MsgType":"event","Event":"subscribe_msg_sent_event",
            "SubscribeMsgSentEvent":{"List":[{"TemplateId":"T1","MsgID":11,"ErrorCode":0,"ErrorStatus":"success"},
            {"TemplateId":"T2","MsgID":12,"ErrorCode":43101,"ErrorStatus":"failed:user refuse"}]}}"#;
        for one in [xml_one, json_one] {
            let event = delivery(only(normalise(
                "wechat",
                "a",
                &parse(one.as_bytes()).expect("parses"),
            )));
            assert_eq!(event.provider_msgid, "1700827132819554304");
            assert_eq!(event.state(), DeliveryState::Delivered);
            assert_eq!(
                event.event_id,
                "wechat:a:1700827132819554304:subscribe_msg_sent_event"
            );
        }
        for many in [xml_many, json_many] {
            let events = normalise("wechat", "a", &parse(many.as_bytes()).expect("parses"));
            let events: Vec<DeliveryEvent> = events.into_iter().map(delivery).collect();
            assert_eq!(events.len(), 2);
            assert_eq!(events[0].provider_msgid, "11");
            assert_eq!(events[0].state(), DeliveryState::Delivered);
            assert_eq!(events[1].provider_msgid, "12");
            assert_eq!(events[1].state(), DeliveryState::Failed);
            assert_eq!(events[1].provider_status, "failed:user refuse");
            assert_ne!(events[0].event_id, events[1].event_id);
        }
    }

    #[test]
    fn follow_and_consent_events_are_recipient_events() {
        let follow = |event: &str| {
            format!(
                "<xml><ToUserName>gh_1</ToUserName><FromUserName><![CDATA[oUser0000000001]]></FromUserName>\
                 <CreateTime>1700000001</CreateTime><MsgType>event</MsgType><Event><![CDATA[{event}]]></Event>\
                 <EventKey><![CDATA[]]></EventKey></xml>"
            )
        };
        for kind in ["subscribe", "unsubscribe"] {
            let event = recipient(only(normalise(
                "wechat",
                "a",
                &parse(follow(kind).as_bytes()).expect("parses"),
            )));
            assert_eq!(event.kind, kind);
            assert_eq!(event.recipient, "oUser0000000001");
            assert_eq!(
                event.event_id,
                format!("wechat:a:oUser0000000001:1700000001:{kind}")
            );
        }
        let popup_xml = "<xml><ToUserName>gh_1</ToUserName><FromUserName>oUser0000000001</FromUserName>\
            <CreateTime>1610969440</CreateTime><MsgType>event</MsgType><Event>subscribe_msg_popup_event</Event>\
            <SubscribeMsgPopupEvent><List><TemplateId>T1</TemplateId><SubscribeStatusString>accept</SubscribeStatusString>\
            <PopupScene>2</PopupScene></List><List><TemplateId>T2</TemplateId>\
            <SubscribeStatusString>reject</SubscribeStatusString><PopupScene>2</PopupScene></List>\
            </SubscribeMsgPopupEvent></xml>";
        let popup_json = r#"{"ToUserName":"gh_1","FromUserName":"oUser0000000001","CreateTime":1610969440,
            "MsgType":"event","Event":"subscribe_msg_popup_event","SubscribeMsgPopupEvent":{"List":[
            {"TemplateId":"T1","SubscribeStatusString":"accept","PopupScene":"2"},
            {"TemplateId":"T2","SubscribeStatusString":"reject","PopupScene":"2"}]}}"#;
        for popup in [popup_xml, popup_json] {
            let event = recipient(only(normalise(
                "wechat",
                "a",
                &parse(popup.as_bytes()).expect("parses"),
            )));
            assert_eq!(event.kind, "subscribe_msg_popup_event");
            let consents: Vec<(&str, &str)> = event
                .consents
                .iter()
                .map(|c| (c.template_id.as_str(), c.status.as_str()))
                .collect();
            assert_eq!(consents, [("T1", "accept"), ("T2", "reject")]);
        }
        let one_json = r#"{"ToUserName":"gh_1","FromUserName":"oUser0000000001","CreateTime":1610969440,
            "MsgType":"event","Event":"subscribe_msg_change_event","SubscribeMsgChangeEvent":{"List":
            {"TemplateId":"T1","SubscribeStatusString":"reject"}}}"#;
        let event = recipient(only(normalise(
            "wechat",
            "a",
            &parse(one_json.as_bytes()).expect("parses"),
        )));
        assert_eq!(event.consents.len(), 1);
    }

    #[test]
    fn unknown_events_and_messages_normalise_to_nothing() {
        let unknown = r#"{"ToUserName":"gh_97417a04a28d","FromUserName":"o9AgO5Kd5ggOC-bXrbNODIiE3bGY",
            "CreateTime":1714112445,"MsgType":"event","Event":"debug_demo","debug_str":"hello world"}"#;
        assert!(normalise("wechat", "a", &parse(unknown.as_bytes()).expect("parses")).is_empty());
        let text = "<xml><ToUserName>gh_1</ToUserName><FromUserName>oUser</FromUserName>\
            <CreateTime>1</CreateTime><MsgType>text</MsgType><Content>hi</Content><MsgId>1</MsgId></xml>";
        assert!(normalise("wechat", "a", &parse(text.as_bytes()).expect("parses")).is_empty());
    }

    #[test]
    fn envelopes_give_their_encrypt_only() {
        let xml = b"<xml><ToUserName><![CDATA[gh_1]]></ToUserName><Encrypt><![CDATA[abc+/=]]></Encrypt></xml>";
        assert_eq!(envelope_encrypt(xml).expect("xml"), "abc+/=");
        let json = br#"{"ToUserName":"gh_1","Encrypt":"abc+/="}"#;
        assert_eq!(envelope_encrypt(json).expect("json"), "abc+/=");
        assert!(matches!(
            envelope_encrypt(b"<xml><ToUserName>x</ToUserName></xml>"),
            Err(ParseError::NoEncrypt)
        ));
    }

    #[test]
    fn entities_and_dtds_are_refused() {
        let body = br#"<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY x "boom">]><xml><MsgType>&x;</MsgType></xml>"#;
        assert!(matches!(parse(body), Err(ParseError::Dtd)));
        assert!(matches!(envelope_encrypt(body), Err(ParseError::Dtd)));
        // Without a declaration, an unknown entity is an error, never expanded.
        let body = b"<xml><MsgType>&x;</MsgType></xml>";
        match parse(body) {
            Ok(parsed) => assert_ne!(parsed.msg_type, "boom"),
            Err(ParseError::Xml(_)) => {}
            Err(other) => panic!("unexpected {other}"),
        }
        assert!(matches!(parse(b"hello"), Err(ParseError::UnknownFormat)));
    }

    /// Caught by the `wechat_xml` fuzz check (a published event decodes at the projector),
    /// input fuzz/corpus/wechat_xml/crash-create-time-year-overflow: a CreateTime past year
    /// 9999 gave an event whose canonical JSON failed to encode, so an empty body was
    /// published and dead-lettered by the projector.
    #[test]
    fn create_time_outside_rfc_3339_is_no_time() {
        for create_time in ["99999999999999", "-99999999999999", "253402300800"] {
            let body = format!(
                "<xml><MsgType>event</MsgType><Event>TEMPLATESENDJOBFINISH</Event>\
                 <MsgID>1</MsgID><CreateTime>{create_time}</CreateTime></xml>"
            );
            let event = delivery(only(normalise(
                "wechat",
                "a",
                &parse(body.as_bytes()).expect("parses"),
            )));
            assert_eq!(event.occurred_at, None, "{create_time}");
            let json = herald_contract::encode_json(&event);
            let decoded: DeliveryEvent = herald_contract::decode_json(&json).expect("decodes");
            assert_eq!(decoded, event);
        }
        let body = job_finish("success").replace("1700000000", "253402300799");
        let event = delivery(only(normalise(
            "wechat",
            "a",
            &parse(body.as_bytes()).expect("parses"),
        )));
        assert_eq!(event.occurred_at.map(|t| t.seconds), Some(253_402_300_799));
    }

    #[test]
    fn openids_are_masked() {
        assert_eq!(mask("oDemoUser000000000000000001x"), "oDem…1x");
        assert_eq!(mask("short"), "***");
    }
}
