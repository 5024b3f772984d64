//! The dead-letter tools: an exhausted job is listed (listing removes nothing), replayed to
//! its lane with a fresh set of attempts (its failed delivery reopened) and then delivered;
//! a poison message is purged by reason.

use herald_amqp::BasicProperties;
use herald_contract::v1::DeliveryState;
use herald_e2e::{TestEnv, demo};
use herald_sandbox::paths;
use heraldctl::dlq::{self, Filter};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_jobs_are_listed_replayed_and_delivered_and_poison_is_purged() {
    let mut env = TestEnv::start_with(|config| config.sender.max_attempts = 2).await;
    env.stack
        .sandbox
        .inject_errors(paths::TEMPLATE_SEND, vec![-1, -1]);
    let id = env.send_demo(demo::OPENID, "D-1").await;
    env.wait_for_status(&id, DeliveryState::Failed).await;
    // A poison job too.
    env.broker
        .publisher()
        .publish(
            &env.broker.topology().deliveries_exchange(),
            herald_contract::channels::WECHAT_TEMPLATE,
            b"not a job",
            BasicProperties::default(),
        )
        .await
        .expect("published");

    let exhausted = Filter {
        reason: Some("exhausted".into()),
        ..Default::default()
    };
    let mut listed = Vec::new();
    for _ in 0..2 {
        // Listing twice finds the same: looking removes nothing. (The exhausted job may need a
        // moment after the `failed` status: it is parked right after.)
        listed = wait_for_parked(&env, &exhausted, 1).await;
    }
    assert_eq!(listed.len(), 1);
    let letter = &listed[0];
    assert_eq!(letter.channel.as_deref(), Some("wechat.template"));
    assert_eq!(letter.lane, Some(herald_amqp::Lane::Normal));
    assert_eq!(letter.attempt, Some(2));
    assert!(letter.dead_at.is_some());
    assert!(
        letter.detail.contains("gave up after 2 attempts"),
        "{}",
        letter.detail
    );
    let poison = wait_for_parked(
        &env,
        &Filter {
            reason: Some("decode_error".into()),
            ..Default::default()
        },
        1,
    )
    .await;
    assert_eq!(poison.len(), 1);

    let store = herald_store::Store::connect(
        &env.stack.config.postgres,
        &env.broker.topology().status_exchange(),
    )
    .await
    .expect("store");
    let stop = CancellationToken::new();
    let report = dlq::replay(
        &env.broker,
        Some(&store),
        &exhausted,
        true,
        &|_, _| {},
        &stop,
    )
    .await
    .expect("replay");
    assert_eq!(report.replayed, 1);
    assert_eq!(report.reopened, 1);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    env.wait_for_status(&id, DeliveryState::Delivered).await;
    let view = env.get_message(&id).await;
    assert_eq!(view["deliveries"][0]["attempts"], 3);
    assert!(
        dlq::list(&env.broker, &exhausted)
            .await
            .expect("list")
            .is_empty(),
        "the replayed copy left the dead-letter queue"
    );

    let purged = dlq::purge(
        &env.broker,
        &Filter {
            reason: Some("decode_error".into()),
            ..Default::default()
        },
        &|_, _| {},
        &stop,
    )
    .await
    .expect("purge");
    assert_eq!(purged, 1);
    assert!(
        dlq::list(&env.broker, &Filter::default())
            .await
            .expect("list")
            .is_empty()
    );
    env.stop().await;
}

/// The parked messages matching `filter`, once there are `n` (parking follows the status the
/// test waited for by a publish confirm).
async fn wait_for_parked(env: &TestEnv, filter: &Filter, n: usize) -> Vec<dlq::DeadLetter> {
    let deadline = tokio::time::Instant::now() + herald_e2e::WAIT;
    loop {
        let found = dlq::list(&env.broker, filter).await.expect("list");
        if found.len() >= n || tokio::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
