use serde_json::json;

use super::*;

const ORDER_SHIPPED: &str = include_str!("../../../../examples/templates/order_shipped.yaml");

fn order_shipped() -> CompiledTemplate {
    let definition = TemplateDefinition::from_yaml(ORDER_SHIPPED).expect("parses");
    definition.validate().expect("valid");
    CompiledTemplate::compile(definition, 1).expect("compiles")
}

fn vars(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn order_vars() -> Map<String, Value> {
    vars(json!({"order_id": "A-1", "carrier": "SF Express", "eta": "tomorrow"}))
}

/// A template with only `variant` under `channels` (YAML, indented as a channel entry).
fn with_variant(variant: &str) -> Result<TemplateDefinition, RenderError> {
    let yaml = format!(
        "id: t\nvariables:\n  name: {{type: string, required: true, example: Ann}}\n  note: {{type: string}}\nchannels:\n{variant}"
    );
    let definition = TemplateDefinition::from_yaml(&yaml)?;
    definition.validate()?;
    Ok(definition)
}

#[test]
fn every_example_file_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/templates");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/templates") {
        let path = entry.expect("entry").path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        let definition = TemplateDefinition::from_yaml(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        definition
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        assert_eq!(definition.id, stem, "file name is the template id");
        seen += 1;
    }
    assert!(seen >= 2, "examples found: {seen}");
}

#[test]
fn every_variant_renders_the_provider_shape() {
    let t = order_shipped();
    let v = order_vars();
    assert_eq!(
        t.render(WECHAT_TEMPLATE, "demo-oa", "", &v)
            .expect("wechat"),
        json!({
            "template_id": "tmpl_order_shipped",
            "url": "https://shop.example.com/orders/A-1",
            "data": {
                "order_id": {"value": "A-1", "color": "#173177"},
                "carrier": {"value": "SF Express"},
                "eta": {"value": "tomorrow"}
            }
        })
    );
    assert_eq!(
        t.render(WECHAT_SUBSCRIBE, "demo-oa", "", &v)
            .expect("subscribe"),
        json!({
            "template_id": "sub_order_shipped",
            "page": "pages/orders/detail?id=A-1",
            "data": {
                "character_string1": {"value": "A-1"},
                "thing2": {"value": "SF Express"},
                "thing3": {"value": "Arrives tomorrow"}
            }
        })
    );
    assert_eq!(
        t.render(WECOM, "", "", &v).expect("wecom"),
        json!({"msgtype": "markdown", "markdown": {"content":
            "**Order A-1 shipped**\n> Carrier: SF Express\n> Arrives: tomorrow"}})
    );
    let mut with_items = v.clone();
    // Struct numbers arrive as doubles; they render as integers.
    with_items.insert("items".into(), json!(3.0));
    assert!(
        t.render(WECOM, "", "", &with_items).expect("wecom")["markdown"]["content"]
            .as_str()
            .is_some_and(|c| c.ends_with("> Items: 3"))
    );
    assert_eq!(
        t.render(DINGTALK, "", "", &v).expect("dingtalk"),
        json!({"msgtype": "actionCard", "actionCard": {
            "title": "Order A-1 shipped",
            "text": "### Order A-1 shipped\nSF Express delivers it tomorrow.",
            "singleTitle": "Track it",
            "singleURL": "https://shop.example.com/orders/A-1"
        }})
    );
    assert_eq!(
        t.render(FEISHU, "", "", &v).expect("feishu"),
        json!({"msg_type": "post", "content": {"post": {"zh_cn": {
            "title": "Order A-1 shipped",
            "content": [[
                {"tag": "text", "text": "SF Express delivers it tomorrow. "},
                {"tag": "a", "text": "Track it", "href": "https://shop.example.com/orders/A-1"}
            ]]
        }}}})
    );
    assert_eq!(
        t.render(EMAIL, "", "", &v).expect("email"),
        json!({
            "subject": "Your order A-1 is on its way",
            "html": "<p>Your order <b>A-1</b> left with SF Express.</p>\n<p>It arrives tomorrow.</p>",
            "text": "Your order A-1 left with SF Express. It arrives tomorrow."
        })
    );
    assert_eq!(
        t.render(SMS, "demo-sms-aliyun", "", &v).expect("sms"),
        json!({"template_id": "SMS_300001", "params": {"order": "A-1", "eta": "tomorrow"}})
    );
    assert_eq!(
        t.render(WEBHOOK, "", "", &v).expect("webhook"),
        json!({"event": "order.shipped",
               "order": {"id": "A-1", "carrier": "SF Express", "eta": "tomorrow"}})
    );
}

#[test]
fn the_other_message_types_render() {
    let text = include_str!("../../../../examples/templates/login_alert.yaml");
    let t = CompiledTemplate::compile(TemplateDefinition::from_yaml(text).expect("parses"), 1)
        .expect("compiles");
    let v = vars(json!({"user": "张三", "device": "Pixel", "at": "2026-11-23 10:15"}));
    let card = t.render(WECOM, "", "", &v).expect("textcard");
    assert_eq!(
        card,
        json!({"msgtype": "textcard", "textcard": {"title": "New sign-in for 张三",
            "description": "Pixel at 2026-11-23 10:15", "url": "https://account.example.com/security",
            "btntxt": "查看详情"}})
    );
    let ding = t.render(DINGTALK, "", "", &v).expect("markdown");
    assert_eq!(ding["markdown"]["title"], "New sign-in");
    assert_eq!(
        ding["at"],
        json!({"atMobiles": ["13800000000"], "atUserIds": [], "isAtAll": false})
    );
    assert_eq!(
        t.render(FEISHU, "", "", &v).expect("text"),
        json!({"msg_type": "text", "content": {"text": "张三 signed in on Pixel at 2026-11-23 10:15"}})
    );
    let email = t.render(EMAIL, "", "", &v).expect("text-only email");
    assert!(email.get("html").is_none());
    let mini = t
        .render(WECHAT_TEMPLATE, "prod-oa", "", &v)
        .expect("miniprogram");
    assert_eq!(mini["template_id"], "Xk3-login-alert-prod");
    assert_eq!(
        mini["miniprogram"],
        json!({"appid": "wxdemominiapp0001", "pagepath": "pages/security?at=2026-11-23 10:15"})
    );
    let subscribe = t
        .render(WECHAT_SUBSCRIBE, "demo-mp", "", &v)
        .expect("subscribe");
    assert_eq!(subscribe["miniprogram_state"], "formal");
    assert_eq!(subscribe["lang"], "zh_CN");
    assert_eq!(subscribe["data"]["phrase3"]["value"], "新设备");
    // Webhook bodies keep non-string values as they are.
    let hook = t.render(WEBHOOK, "", "", &v).expect("webhook");
    assert_eq!(hook["tags"], json!(["security", "login"]));
    assert_eq!(hook["severity"], 2);
}

#[test]
fn html_is_escaped_and_text_is_not() {
    let t = order_shipped();
    let mut v = order_vars();
    v.insert("order_id".into(), json!("<A&1>"));
    let email = t.render(EMAIL, "", "", &v).expect("email");
    assert!(
        email["html"]
            .as_str()
            .is_some_and(|h| h.contains("<b>&lt;A&amp;1&gt;</b>")),
        "{email}"
    );
    assert!(
        email["text"]
            .as_str()
            .is_some_and(|t| t.contains("order <A&1> left"))
    );
    assert_eq!(email["subject"], "Your order <A&1> is on its way");
    // WeChat data values stay values.
    let wechat = t
        .render(WECHAT_TEMPLATE, "demo-oa", "", &v)
        .expect("wechat");
    assert_eq!(wechat["data"]["order_id"]["value"], "<A&1>");
    assert_eq!(wechat["url"], "https://shop.example.com/orders/<A&1>");
    // A value is substituted once, never evaluated as a template.
    v.insert("carrier".into(), json!("{{ eta }}"));
    let wechat = t
        .render(WECHAT_TEMPLATE, "demo-oa", "", &v)
        .expect("wechat");
    assert_eq!(wechat["data"]["carrier"]["value"], "{{ eta }}");
}

#[test]
fn locales_fall_back_to_the_language_then_the_default() {
    let t = order_shipped();
    let v = order_vars();
    for locale in ["zh_CN", "zh-TW", "zh"] {
        let wecom = t.render(WECOM, "", locale, &v).expect("zh");
        assert_eq!(wecom["msgtype"], "text", "{locale}");
        assert!(
            wecom["text"]["content"]
                .as_str()
                .is_some_and(|c| c.contains("已由SF Express发出"))
        );
        let sms = t
            .render(SMS, "demo-sms-aliyun", locale, &v)
            .expect("zh sms");
        // No zh SMS variant: the provider's approved template is the text, in any locale.
        assert_eq!(sms["template_id"], "SMS_300001", "{locale}");
    }
    // No zh e-mail variant: the default one.
    let email = t.render(EMAIL, "", "zh_CN", &v).expect("email");
    assert_eq!(email["subject"], "Your order A-1 is on its way");
    assert_eq!(
        t.render(WECOM, "", "en_US", &v).expect("en")["msgtype"],
        "markdown"
    );
}

#[test]
fn missing_and_mistyped_variables_are_named() {
    let t = order_shipped();
    let err = t
        .render(
            WECHAT_TEMPLATE,
            "demo-oa",
            "",
            &vars(json!({"order_id": "A", "carrier": "c"})),
        )
        .expect_err("required");
    assert_eq!(err.field, "variables.eta");
    let mut v = order_vars();
    v.insert("order_id".into(), json!(7));
    let err = t
        .render(WECHAT_TEMPLATE, "demo-oa", "", &v)
        .expect_err("mistyped");
    assert_eq!(
        err,
        RenderError::new("variables.order_id", "must be a string")
    );
    // An optional variable used without a guard is named when the request lacks it.
    let definition =
        with_variant("  feishu: {msg_type: text, text: \"Hi {{ name }} {{ note }}\"}\n")
            .expect("valid: the sample data has every variable");
    let t = CompiledTemplate::compile(definition, 1).expect("compiles");
    let err = t
        .render(FEISHU, "", "", &vars(json!({"name": "Ann"})))
        .expect_err("note missing");
    assert_eq!(err.field, "variables.note");
    assert!(
        err.message.contains("channels.feishu.text"),
        "{}",
        err.message
    );
}

#[test]
fn unknown_account_is_a_template_config_error() {
    let err = order_shipped()
        .render(WECHAT_TEMPLATE, "prod-oa", "", &order_vars())
        .expect_err("no template id");
    assert_eq!(err.field, "channels.wechat.template.template_ids");
    assert!(err.message.contains("prod-oa"), "{}", err.message);
}

#[test]
fn publish_validation_names_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "  wecom: {msgtype: text, content: \"{{ name }} {{ nobody }}\"}\n",
            "channels.wecom.content",
            "`nobody`",
        ),
        (
            "  wechat.subscribe:\n    template_ids: {a: t}\n    data:\n      thing1: {value: \"{{ name }} has a very long thing value\"}\n",
            "channels.wechat.subscribe.data.thing1.value",
            "at most 20",
        ),
        (
            "  wechat.subscribe:\n    template_ids: {a: t}\n    data:\n      keyword1: {value: x}\n",
            "channels.wechat.subscribe.data.keyword1",
            "thing1",
        ),
        (
            "  sms2: {text: hi}\n",
            "channels.sms2",
            "unknown field `sms2`",
        ),
        (
            "  wecom: {msgtype: news, content: x}\n",
            "channels.wecom.msgtype",
            "unknown variant `news`",
        ),
        (
            "  wechat.template:\n    template_ids: {a: t}\n    data: {k: {value: x, color: red}}\n",
            "channels.wechat.template.data.k.color",
            "colour",
        ),
        (
            "  dingtalk: {msgtype: actionCard, title: t, text: x, single_title: a, single_url: u, btns: [{title: b, action_url: u}]}\n",
            "channels.dingtalk.btns",
            "either",
        ),
        (
            "  sms: {template_ids: {a: t}, text: x}\n",
            "channels.sms.text",
            "either",
        ),
        (
            "  email: {subject: x}\n",
            "channels.email.html",
            "html, text",
        ),
        (
            "  feishu: {msg_type: post, lang: fr_fr, title: t, content: []}\n",
            "channels.feishu.lang",
            "zh_cn",
        ),
        (
            "  feishu: {msg_type: text, text: \"{{ name \"}\n",
            "channels.feishu.text",
            "syntax",
        ),
    ];
    for (variant, field, needle) in cases {
        let err = with_variant(variant).expect_err(variant);
        assert_eq!(&err.field, field, "{variant}: {err}");
        assert!(err.message.contains(needle), "{variant}: {err}");
        // The path is said once, in `field`.
        assert!(!err.message.starts_with("channels"), "{err}");
    }
    let err = TemplateDefinition::from_yaml("id: t\nchannels: {}\n")
        .and_then(|d| d.validate())
        .expect_err("no variant");
    assert_eq!(err.field, "channels");
    let err = TemplateDefinition::from_yaml(
        "id: t\nchannels: {email: {subject: s, text: t}}\nlocales: {fr: {wecom: {msgtype: text, content: x}}}\n",
    )
    .and_then(|d| d.validate())
    .expect_err("locale without a default");
    assert_eq!(err.field, "locales.fr.wecom");
}

#[test]
fn rendered_sizes_are_checked_against_channel_limits() {
    let long = |n: usize| vars(json!({"name": "x".repeat(n)}));
    let text = CompiledTemplate::compile(
        with_variant("  wecom: {msgtype: text, content: \"{{ name }}\"}\n").expect("valid"),
        1,
    )
    .expect("compiles");
    assert!(text.render(WECOM, "", "", &long(2048)).is_ok());
    let err = text
        .render(WECOM, "", "", &long(2049))
        .expect_err("over 2048 bytes");
    assert_eq!(err.field, "channels.wecom.content");
    assert!(err.message.contains("2049 bytes"), "{err}");
    // Bytes, not characters: 683 CJK characters are 2049 bytes.
    let cjk = vars(json!({"name": "字".repeat(683)}));
    assert!(text.render(WECOM, "", "", &cjk).is_err());

    let markdown = CompiledTemplate::compile(
        with_variant("  wecom: {msgtype: markdown, content: \"{{ name }}\"}\n").expect("valid"),
        1,
    )
    .expect("compiles");
    assert!(markdown.render(WECOM, "", "", &long(4096)).is_ok());
    assert!(markdown.render(WECOM, "", "", &long(4097)).is_err());

    let feishu = CompiledTemplate::compile(
        with_variant("  feishu: {msg_type: text, text: \"{{ name }}\"}\n").expect("valid"),
        1,
    )
    .expect("compiles");
    let err = feishu
        .render(FEISHU, "", "", &long(21_000))
        .expect_err("over 20 KB");
    assert_eq!(err.field, "channels.feishu");

    let ding = CompiledTemplate::compile(
        with_variant("  dingtalk: {msgtype: text, content: \"{{ name }}\"}\n").expect("valid"),
        1,
    )
    .expect("compiles");
    assert!(ding.render(DINGTALK, "", "", &long(20_001)).is_err());

    let sms = CompiledTemplate::compile(
        with_variant("  sms: {template_ids: {a: T1}, params: {who: \"{{ name }}\"}}\n")
            .expect("valid"),
        1,
    )
    .expect("compiles");
    assert!(sms.render(SMS, "a", "", &long(35)).is_ok());
    let err = sms
        .render(SMS, "a", "", &long(36))
        .expect_err("param too long");
    assert_eq!(err.field, "channels.sms.params.who");

    let subject = CompiledTemplate::compile(
        with_variant("  email: {subject: \"Hi {{ name }}\", text: x}\n").expect("valid"),
        1,
    )
    .expect("compiles");
    let err = subject
        .render(
            EMAIL,
            "",
            "",
            &vars(json!({"name": "a\r\nBcc: x@example.com"})),
        )
        .expect_err("header injection");
    assert_eq!(err.field, "channels.email.subject");

    let subscribe = CompiledTemplate::compile(
        with_variant(
            "  wechat.subscribe:\n    template_ids: {a: t}\n    data:\n      thing1: {value: \"{{ name }}\"}\n",
        )
        .expect("valid"),
        1,
    )
    .expect("compiles");
    let err = subscribe
        .render(WECHAT_SUBSCRIBE, "a", "", &long(21))
        .expect_err("thing over 20");
    assert_eq!(err.field, "channels.wechat.subscribe.data.thing1.value");
}

#[test]
fn stored_form_round_trips() {
    let definition = TemplateDefinition::from_yaml(ORDER_SHIPPED).expect("parses");
    let stored = definition.to_json();
    assert_eq!(
        TemplateDefinition::from_json(stored.clone()).expect("reads back"),
        definition
    );
    // JSON is YAML too: what the API returns can be applied again.
    let again = TemplateDefinition::from_yaml(&serde_json::to_string(&stored).expect("json"))
        .expect("json");
    assert_eq!(again, definition);
}

#[test]
fn preview_renders_every_channel() {
    let t = order_shipped();
    let preview = t.preview("", &t.definition.sample_variables(), |_, accounts| {
        accounts.first().map(|a| a.to_string()).unwrap_or_default()
    });
    let mut all = TEMPLATE_CHANNELS.to_vec();
    all.sort();
    assert_eq!(preview.keys().copied().collect::<Vec<_>>(), all);
    for (channel, rendered) in &preview {
        assert!(rendered.is_ok(), "{channel}: {rendered:?}");
    }
}

#[test]
fn lists_and_objects_feed_loops_and_attributes() {
    let definition = TemplateDefinition::from_yaml(
        r#"
id: receipt
variables:
  order: {type: object, required: true, example: {id: A-1}}
  lines: {type: list, required: true, example: [{name: Tea, qty: 2}]}
channels:
  email:
    subject: "Receipt {{ order.id }}"
    html: "<ul>{% for l in lines %}<li>{{ l.qty }} × {{ l.name }}</li>{% endfor %}</ul>"
"#,
    )
    .expect("parses");
    definition.validate().expect("valid");
    let t = CompiledTemplate::compile(definition, 1).expect("compiles");
    let email = t
        .render(
            EMAIL,
            "",
            "",
            &vars(json!({"order": {"id": "B-2"}, "lines": [{"name": "<Cake>", "qty": 1.0}]})),
        )
        .expect("renders");
    assert_eq!(email["subject"], "Receipt B-2");
    assert_eq!(email["html"], "<ul><li>1 × &lt;Cake&gt;</li></ul>");
    let err = t
        .render(EMAIL, "", "", &vars(json!({"order": "B-2", "lines": []})))
        .expect_err("not an object");
    assert_eq!(
        err,
        RenderError::new("variables.order", "must be an object")
    );
}

#[test]
fn a_runaway_template_is_refused_at_publish() {
    let err = with_variant(
        "  feishu: {msg_type: text, text: \"{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}\"}\n",
    )
    .expect_err("out of fuel");
    assert_eq!(err.field, "channels.feishu.text");
    assert!(err.message.contains("fuel"), "{err}");
}
