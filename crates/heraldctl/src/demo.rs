//! The demo tenant that `heraldctl up` seeds, and the request `heraldctl send` publishes.

use herald_contract::v1::{NotificationRequest, Recipient, TemplateRef};
use herald_renderer::TemplateDefinition;
use herald_store::Store;
use serde_json::json;

pub const TENANT: &str = "demo";
/// A fixed key so the README's curl line works; real keys come from `Store::create_api_key`.
pub const API_KEY: &str = "hk_demo_local_development_only_0001";
pub const ACCOUNT: &str = "demo-oa";
pub const APPID: &str = "wxdemo0000000001";
pub const TEMPLATE: &str = "order_shipped";
pub const WECHAT_TEMPLATE_ID: &str = "tmpl_order_shipped";
/// 28 characters, like a real openid.
pub const OPENID: &str = "oDemoUser000000000000000001x";
/// The demo WeCom application (the sandbox's demo corp, agent 1000002) and a member of it.
pub const WECOM_ACCOUNT: &str = "demo-wecom";
pub const WECOM_CORPID: &str = "wwdemo0000000001";
pub const WECOM_AGENT_ID: u32 = 1_000_002;
pub const WECOM_USERID: &str = "zhangsan";
/// The demo group robots (the sandbox's demo robots).
pub const WECOM_ROBOT: &str = "demo-wecom-robot";
pub const DINGTALK_ROBOT: &str = "demo-dingtalk";
pub const FEISHU_ROBOT: &str = "demo-feishu";
/// The demo SMTP account: a relay on 127.0.0.1:2525 without TLS (any local sink, e.g.
/// `python3 tests/smtp/sink.py --port 2525`), sending as the demo shop.
pub const EMAIL_ACCOUNT: &str = "demo-email";
pub const EMAIL_FROM: &str = "Demo shop <no-reply@shop.example>";
pub const EMAIL_RELAY_PORT: u16 = 2525;
/// The demo SMS accounts (the sandbox's demo Tencent Cloud and Aliyun accounts). Aliyun's is
/// the tenant's default `sms` account (the demo template's `sms` variant names it); Tencent's
/// is there for templates with a Tencent template id.
pub const SMS_TENCENT_ACCOUNT: &str = "demo-sms-tencent";
pub const SMS_ALIYUN_ACCOUNT: &str = "demo-sms-aliyun";
/// The secrets in the demo accounts' receipt URLs (`?token=`).
pub const SMS_TENCENT_RECEIPT_TOKEN: &str = "demo-tencent-sms-receipt-token-0001";
pub const SMS_ALIYUN_RECEIPT_TOKEN: &str = "demo-aliyun-sms-receipt-token-0001";
/// A mainland number for the demo.
pub const SMS_PHONE: &str = "+8613800138000";
/// The demo tenant's `webhook` account and its signing secret (base64 of
/// `herald-demo-webhook-secret-0001`). No allow-list: private targets are refused until
/// `[sender.webhooks.demo-webhook] allow` names them.
pub const WEBHOOK_ACCOUNT: &str = "demo-webhook";
pub const WEBHOOK_SECRET: &str = "whsec_aGVyYWxkLWRlbW8td2ViaG9vay1zZWNyZXQtMDAwMQ==";

/// The `order_shipped` template (`examples/templates/order_shipped.yaml` links to this file).
pub const TEMPLATE_YAML: &str = include_str!("order_shipped.yaml");

/// The `order_shipped` template definition.
pub fn template_definition() -> Result<TemplateDefinition, herald_renderer::RenderError> {
    TemplateDefinition::from_yaml(TEMPLATE_YAML)
}

/// Seeds the demo tenant (publishing over AMQP as `amqp_user`), its API key, its WeChat
/// account, WeCom application, group robots, SMTP and SMS accounts, and the `order_shipped`
/// template. Idempotent.
pub async fn seed(store: &Store, amqp_user: &str) -> Result<(), herald_store::StoreError> {
    store
        .upsert_tenant(TENANT, "Demo shop", Some(amqp_user))
        .await?;
    store.insert_api_key(TENANT, API_KEY).await?;
    store
        .upsert_provider_account(
            ACCOUNT,
            TENANT,
            "wechat_official_account",
            herald_contract::channels::WECHAT_TEMPLATE,
            APPID,
            true,
        )
        .await?;
    use herald_contract::channels;
    for (id, kind, channel, app_id) in [
        (WECOM_ACCOUNT, "wecom_app", channels::WECOM, WECOM_CORPID),
        (WECOM_ROBOT, "wecom_robot", channels::WECOM_ROBOT, ""),
        (DINGTALK_ROBOT, "dingtalk_robot", channels::DINGTALK, ""),
        (FEISHU_ROBOT, "feishu_robot", channels::FEISHU, ""),
        (EMAIL_ACCOUNT, "smtp", channels::EMAIL, ""),
        (WEBHOOK_ACCOUNT, "webhook", channels::WEBHOOK, ""),
    ] {
        store
            .upsert_provider_account(id, TENANT, kind, channel, app_id, true)
            .await?;
    }
    for (id, kind, app_id, default) in [
        (SMS_ALIYUN_ACCOUNT, "aliyun_sms", "", true),
        (SMS_TENCENT_ACCOUNT, "tencent_sms", "1400000001", false),
    ] {
        store
            .upsert_provider_account(id, TENANT, kind, channels::SMS, app_id, default)
            .await?;
    }
    let definition = template_definition()
        .map_err(|e| herald_store::StoreError::Config(format!("demo template: {e}")))?;
    store
        .publish_template(TENANT, TEMPLATE, &definition.to_json())
        .await?;
    Ok(())
}

/// A request for the demo template to `openid`.
pub fn request(openid: &str, order_id: &str) -> NotificationRequest {
    let variables = json!({"order_id": order_id, "carrier": "SF Express", "eta": "tomorrow"});
    NotificationRequest {
        template: Some(TemplateRef {
            id: TEMPLATE.into(),
            ..Default::default()
        }),
        variables: serde_json::from_value(variables).ok(),
        recipients: vec![Recipient {
            wechat_openid: openid.into(),
            ..Default::default()
        }],
        channels: vec![herald_contract::channels::WECHAT_TEMPLATE.into()],
        ..Default::default()
    }
}

/// The RabbitMQ user in an AMQP URL (`guest` when none is given, as RabbitMQ defaults).
pub fn amqp_user(url: &str) -> String {
    url.split_once("://")
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split_once('@'))
        .map(|(userinfo, _)| userinfo.split(':').next().unwrap_or("guest").to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "guest".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_template_is_valid() {
        let definition = super::template_definition().expect("parses");
        definition.validate().expect("valid");
        assert_eq!(definition.id, super::TEMPLATE);
    }

    #[test]
    fn amqp_user_from_url() {
        assert_eq!(super::amqp_user("amqp://alice:pw@host:5672/%2f"), "alice");
        assert_eq!(super::amqp_user("amqp://host:5672"), "guest");
    }
}
