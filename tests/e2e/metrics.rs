//! `/metrics` speaks Prometheus text and moves when a notification goes through.

use herald_contract::v1::DeliveryState;
use herald_e2e::{TestEnv, demo, metric_sample as sample};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_the_send() {
    let mut env = TestEnv::start_with(|config| {
        config.telemetry.admin_listen = Some("127.0.0.1:0".into());
        config.amqp.depth_sample_interval_ms = 100;
    })
    .await;
    let admin = env.stack.admin_url.clone().expect("admin listener");
    let id = env.send_demo(demo::OPENID, "MX-1").await;
    env.wait_for_status(&id, DeliveryState::Delivered).await;

    let response = env
        .http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("text");
    // Every sample line is `name{labels} value` with a numeric value; every metric has a TYPE.
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let value = line.rsplit(' ').next().unwrap_or_default();
        assert!(value.parse::<f64>().is_ok(), "not a sample: {line}");
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            text.contains(&format!("# TYPE {family} "))
                || text.contains(&format!("# TYPE {name} ")),
            "no TYPE for {name}"
        );
    }
    let render_queue = env.broker.topology().render_queue();
    assert!(
        sample(
            &text,
            "herald_consumer_messages_total",
            &[("queue", &render_queue), ("disposition", "ack")]
        )
        .is_some_and(|v| v >= 1.0),
        "the rendered request is counted:\n{text}"
    );
    assert!(
        sample(
            &text,
            "herald_stage_duration_seconds_count",
            &[("stage", "send")]
        )
        .is_some_and(|v| v >= 1.0),
        "the send's duration is recorded"
    );
    for path in ["/healthz", "/readyz"] {
        let status = env
            .http
            .get(format!("{admin}{path}"))
            .send()
            .await
            .expect("answer")
            .status();
        assert_eq!(status, 200, "{path}");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_dead_letters_and_queue_lag_are_measured() {
    let env = TestEnv::start_with(|config| {
        config.telemetry.admin_listen = Some("127.0.0.1:0".into());
        config.amqp.depth_sample_interval_ms = 100;
    })
    .await;
    let dead = env.broker.topology().dead_queue();
    let render = env.broker.topology().render_queue();
    // Metrics are process-wide and tests share the process: this test's queues have their
    // own names, the DLQ gauge is read through its per-queue twin.
    let text = env
        .scrape_until(|text| {
            sample(text, "herald_queue_depth", &[("queue", &dead)]) == Some(0.0)
                && sample(text, "herald_queue_depth", &[("queue", &render)]).is_some()
        })
        .await;
    assert!(
        sample(&text, "herald_dlq_depth", &[]).is_some(),
        "dlq gauge:\n{text}"
    );

    // Two malformed requests are parked; the gauge follows.
    env.publish_request(b"{not json", Some("guest"), None).await;
    env.publish_request(b"[]", Some("guest"), None).await;
    env.scrape_until(|text| sample(text, "herald_queue_depth", &[("queue", &dead)]) == Some(2.0))
        .await;

    // The delivery job is published by Herald (the renderer's outbox relay): the sender
    // records how long it waited in the queue.
    let send = env.broker.topology().lane_queue(
        herald_contract::channels::WECHAT_TEMPLATE,
        herald_amqp::Lane::Normal,
    );
    let mut env = env;
    let id = env.send_demo(demo::OPENID, "MX-LAG").await;
    env.wait_for_status(&id, DeliveryState::Delivered).await;
    env.scrape_until(|text| {
        sample(text, "herald_queue_lag_seconds_count", &[("queue", &send)])
            .is_some_and(|v| v >= 1.0)
    })
    .await;
    env.stop().await;
}
