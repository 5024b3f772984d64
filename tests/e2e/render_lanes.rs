//! Render lanes: a campaign (large fan-outs, bulk priority) moves to the bulk render lane, so an
//! urgent request published right behind it is rendered at once instead of after every
//! campaign recipient; the moved requests are then rendered exactly once each, under the
//! tenant that published them.

use std::time::Duration;

use herald_contract::v1::Priority;
use herald_e2e::{TestEnv, demo, openid};

const CAMPAIGNS: usize = 6;
const PER_CAMPAIGN: usize = 400;

const DELIVERIES_OF: &str =
    "SELECT count(*) FROM deliveries WHERE message_id = ANY($1::text[]::uuid[])";

async fn count(db: &tokio_postgres::Client, ids: &[String]) -> i64 {
    db.query_one(DELIVERIES_OF, &[&ids])
        .await
        .expect("count deliveries")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_request_overtakes_a_campaign_queued_before_it() {
    // No sender: the jobs stay queued. One request at a time on each render lane, in small
    // batches, so that without lanes the urgent request would wait for every campaign.
    let env = TestEnv::start_with(|config| {
        config.sender.channels = vec![];
        config.renderer.in_flight = 1;
        config.renderer.bulk_in_flight = 1;
        config.renderer.fanout_batch = 50;
    })
    .await;
    let db = env.db().await;

    let mut campaigns = Vec::new();
    for c in 0..CAMPAIGNS {
        let openids: Vec<String> = (0..PER_CAMPAIGN)
            .map(|n| openid(c * PER_CAMPAIGN + n))
            .collect();
        // Normal priority: moved for its size alone.
        campaigns.push(
            env.send_demo_to(&openids, Priority::Normal, &format!("C-{c}"))
                .await,
        );
    }
    // Bulk priority with one recipient: moved for its priority.
    let small_bulk = env
        .send_demo_to(&[openid(100_000)], Priority::Bulk, "B-1")
        .await;
    let urgent = env
        .send_demo_to(&[openid(200_000)], Priority::Urgent, "U-1")
        .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while count(&db, std::slice::from_ref(&urgent)).await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the urgent request was not rendered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let campaign_total = (CAMPAIGNS * PER_CAMPAIGN) as i64;
    let rendered_before_urgent = count(&db, &campaigns).await;
    assert!(
        rendered_before_urgent < campaign_total / 2,
        "the urgent request waited for the campaign: {rendered_before_urgent} of \
         {campaign_total} campaign deliveries were rendered before it"
    );

    // Every moved request is rendered, once.
    let mut moved = campaigns.clone();
    moved.push(small_bulk.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while count(&db, &moved).await < campaign_total + 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bulk lane did not render everything: {} of {}",
            count(&db, &moved).await,
            campaign_total + 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &moved {
        let row = db
            .query_one(
                "SELECT tenant_id, (SELECT count(*) FROM deliveries d WHERE d.message_id = m.id)
                 FROM messages m WHERE id = $1::text::uuid",
                &[id],
            )
            .await
            .expect("message row");
        let tenant: String = row.get(0);
        let deliveries: i64 = row.get(1);
        assert_eq!(tenant, demo::TENANT, "message {id}");
        let expected = if *id == small_bulk {
            1
        } else {
            PER_CAMPAIGN as i64
        };
        assert_eq!(deliveries, expected, "deliveries of message {id}");
    }
    let bulk_lane = env.broker.topology().render_bulk_queue();
    assert_eq!(
        env.queue_depth(&bulk_lane).await,
        0,
        "bulk render lane drained"
    );
    env.stop().await;
}
