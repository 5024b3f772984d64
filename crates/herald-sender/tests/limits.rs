//! The shared rate limiter against the real Redis at 127.0.0.1:6379 (a unique key prefix per
//! test, removed afterwards), and its local fallback when Redis cannot be reached.

use std::time::Duration;

use herald_config::RedisSettings;
use herald_sender::limit::{RateLimit, RateLimiter, Slot};
use tokio::time::Instant;

fn settings(url: &str) -> RedisSettings {
    RedisSettings {
        url: url.into(),
        key_prefix: format!(
            "herald-test-{}:",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ),
    }
}

const TEN_A_SECOND: RateLimit = RateLimit {
    per_second: 10.0,
    burst: 1,
};

async fn remove_key(settings: &RedisSettings, key: &str) {
    let client = redis::Client::open(settings.url.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: () = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("del");
}

#[tokio::test]
async fn replicas_share_one_schedule_and_far_slots_are_not_reserved() {
    let redis = settings("redis://127.0.0.1:6379/");
    // Two replicas of the same deployment: one schedule for the account.
    let a = RateLimiter::new(&redis, 2, Duration::from_millis(450), Duration::ZERO);
    let b = RateLimiter::new(&redis, 2, Duration::from_millis(450), Duration::ZERO);
    let start = Instant::now();
    let mut slots = Vec::new();
    for n in 0..5 {
        let limiter = if n % 2 == 0 { &a } else { &b };
        match limiter.reserve("acct", TEN_A_SECOND).await {
            Slot::At(at) => slots.push(at.saturating_duration_since(start)),
            Slot::Later(wait) => panic!("slot {n} not reserved (wait {wait:?})"),
        }
    }
    for (n, slot) in slots.iter().enumerate() {
        let expected = Duration::from_millis(100) * n as u32;
        let off = slot.abs_diff(expected);
        assert!(
            off < Duration::from_millis(40),
            "slot {n} at {slot:?}, expected about {expected:?}"
        );
    }
    // The sixth slot is 500 ms away, beyond the 450 ms bound: refused, and not taken.
    let refused = a.reserve("acct", TEN_A_SECOND).await;
    assert!(
        matches!(refused, Slot::Later(wait) if wait > Duration::from_millis(400)),
        "{refused:?}"
    );
    let again = b.reserve("acct", TEN_A_SECOND).await;
    assert!(
        matches!(again, Slot::Later(_)),
        "the refusal reserved nothing: {again:?}"
    );
    // Another account has its own schedule.
    assert!(matches!(
        a.reserve("other", TEN_A_SECOND).await,
        Slot::At(at) if at.saturating_duration_since(start) < Duration::from_millis(100)
    ));
    remove_key(&redis, &a.key("acct")).await;
    remove_key(&redis, &a.key("other")).await;
}

#[tokio::test]
async fn without_redis_each_replica_gets_its_share() {
    // Nothing listens on port 1.
    let redis = settings("redis://127.0.0.1:1/");
    let limiter = RateLimiter::new(&redis, 2, Duration::from_millis(100), Duration::ZERO);
    assert!(matches!(
        limiter.reserve("acct", TEN_A_SECOND).await,
        Slot::At(_)
    ));
    // Ten a second over two replicas: five a second here, so the next is 200 ms away.
    match limiter.reserve("acct", TEN_A_SECOND).await {
        Slot::Later(wait) => assert!(
            wait > Duration::from_millis(150) && wait <= Duration::from_millis(200),
            "{wait:?}"
        ),
        Slot::At(_) => panic!("the local limiter let a second send through at once"),
    }
}
