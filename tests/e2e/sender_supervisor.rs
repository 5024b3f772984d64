//! A subscription the broker ends (here: the queue is deleted under the worker) does not end
//! the sender: its supervisor reconnects, declares the topology again and goes on consuming.

use herald_contract::v1::DeliveryState;
use herald_e2e::{TestEnv, demo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_comes_back_after_its_queue_is_deleted() {
    let mut env = TestEnv::start().await;
    let id = env.send_demo(demo::OPENID, "S-1").await;
    env.wait_for_status(&id, DeliveryState::Sent).await;

    let queue = env
        .broker
        .topology()
        .send_queue(herald_contract::channels::WECHAT_TEMPLATE);
    let channel = env.broker.open_channel().await.expect("channel");
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .expect("queue deleted");
    let _ = channel.close(200, "OK".into()).await;

    // The renderer's publish is refused until the queue exists again (it retries); the worker
    // must be consuming it by then.
    let id = env.send_demo(demo::OPENID, "S-2").await;
    env.wait_for_status(&id, DeliveryState::Sent).await;
    env.stop().await;
}
