//! Limits narrower than a provider account: WeCom drops, without an error, whatever passes 30
//! messages a minute to one member, so the sender spaces each member's messages under a
//! per-member limit, while other members of the same application are not held back.

use std::time::Duration;

use herald_contract::channels;
use herald_contract::v1::{DeliveryState, Recipient};
use herald_e2e::{TestEnv, demo};
use herald_sender::limit::{AccountSettings, RateLimit};
use heraldctl::demo as seed;

const BUSY_MEMBER_SENDS: usize = 8;

fn wecom_request(order: &str, userid: &str) -> herald_contract::v1::NotificationRequest {
    let mut request = demo::request(demo::OPENID, order);
    request.id = uuid::Uuid::now_v7().to_string();
    request.channels = vec![channels::WECOM.into()];
    request.recipients = vec![Recipient {
        wecom_userid: userid.into(),
        ..Default::default()
    }];
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_members_messages_are_spaced_while_other_members_are_not_held_back() {
    // 4 a second with bursts of 2 (a fast stand-in for WeCom's 30 a minute).
    let member_limit = RateLimit {
        per_second: 4.0,
        burst: 2,
    };
    let mut env = TestEnv::start_with(|config| {
        let account = config
            .sender
            .accounts
            .entry(seed::WECOM_ACCOUNT.into())
            .or_insert_with(AccountSettings::default);
        account.member_rate_limit = Some(member_limit);
    })
    .await;

    let mut requests = Vec::new();
    for n in 0..BUSY_MEMBER_SENDS {
        requests.push(wecom_request(&format!("NL-Z{n}"), seed::WECOM_USERID));
    }
    requests.push(wecom_request("NL-L1", "lisi"));
    requests.push(wecom_request("NL-L2", "lisi"));
    for request in &requests {
        env.publish_request(&herald_contract::encode_json(request), Some("guest"), None)
            .await;
    }
    env.wait_for_deliveries(DeliveryState::Sent, requests.len(), Duration::from_secs(30))
        .await;

    let messages = env.stack.sandbox.wecom_messages();
    let times = |userid: &str| {
        let mut at: Vec<_> = messages
            .iter()
            .filter(|m| m.userid == userid)
            .map(|m| m.at)
            .collect();
        at.sort();
        at
    };
    let busy = times(seed::WECOM_USERID);
    let other = times("lisi");
    assert_eq!(busy.len(), BUSY_MEMBER_SENDS);
    assert_eq!(other.len(), 2);
    assert!(
        messages.iter().all(|m| !m.dropped),
        "WeCom dropped a message"
    );

    // GCRA at 4/s with bursts of 2: the n-th send is at least (n - 2) / 4 s after the first,
    // and no 1-second window holds more than 2 + 4.
    let span = busy[BUSY_MEMBER_SENDS - 1] - busy[0];
    let least = Duration::from_secs_f64((BUSY_MEMBER_SENDS - 2) as f64 / 4.0);
    assert!(
        span.to_std().unwrap_or_default() >= least - Duration::from_millis(50),
        "{BUSY_MEMBER_SENDS} sends to one member took {span} (at least {least:?} expected)"
    );
    for window in busy.windows(7) {
        assert!(
            window[6] - window[0] >= chrono::Duration::milliseconds(950),
            "7 sends to one member within a second: {window:?}"
        );
    }
    // The other member's messages went at once, not behind the busy member's queue.
    assert!(
        other[1] < busy[BUSY_MEMBER_SENDS - 1],
        "lisi waited for zhangsan: lisi {other:?}, zhangsan {busy:?}"
    );
    env.stop().await;
}
