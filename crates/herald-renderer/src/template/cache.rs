//! The renderer's cache of compiled template versions.
//!
//! Versions are immutable, so a pinned version stays cached. The published pointer moves: the
//! ingress announces every move on the control exchange (through its outbox, in the same
//! transaction), and each renderer, listening on a private queue, drops that template. A
//! generation counter keeps a load that raced with an announcement from caching the old
//! version; a short lifetime bounds the damage of an announcement lost while the renderer was
//! disconnected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use herald_store::{Store, StoreError, TemplateRecord};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{CompiledTemplate, RenderError, TemplateDefinition};

/// How long a published version is trusted without an announcement.
const PUBLISHED_TTL: Duration = Duration::from_secs(60);
/// Pinned versions kept at most; beyond it the pinned cache starts over.
const PINNED_MAX: usize = 1024;

/// A message on the control exchange (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ControlMessage {
    /// `template`'s published pointer moved to `version`.
    TemplatePublished {
        tenant: String,
        template: String,
        version: i32,
    },
}

impl ControlMessage {
    pub const ROUTING_KEY: &'static str = "template.published";
}

type Key = (String, String);

#[derive(Default)]
struct Inner {
    generation: u64,
    published: HashMap<Key, (Arc<CompiledTemplate>, Instant)>,
    pinned: HashMap<(String, String, i32), Arc<CompiledTemplate>>,
}

#[derive(Default)]
pub struct TemplateCache {
    inner: Mutex<Inner>,
    /// Published versions are cached only while announcements can be heard.
    listening: AtomicBool,
}

impl TemplateCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The compiled version of a template: the published one when `version` is `None`.
    /// `Ok(Err)` is a permanent problem (unknown template or version, invalid definition).
    pub async fn get(
        &self,
        store: &Store,
        tenant: &str,
        id: &str,
        version: Option<i32>,
    ) -> Result<Result<Arc<CompiledTemplate>, RenderError>, StoreError> {
        self.get_or_load(tenant, id, version, || store.template(tenant, id, version))
            .await
    }

    async fn get_or_load<F, Fut>(
        &self,
        tenant: &str,
        id: &str,
        version: Option<i32>,
        load: F,
    ) -> Result<Result<Arc<CompiledTemplate>, RenderError>, StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<TemplateRecord>, StoreError>>,
    {
        let generation = {
            let inner = self.lock();
            let hit = match version {
                Some(v) => inner
                    .pinned
                    .get(&(tenant.to_string(), id.to_string(), v))
                    .cloned(),
                None => inner
                    .published
                    .get(&(tenant.to_string(), id.to_string()))
                    .filter(|(_, at)| at.elapsed() < PUBLISHED_TTL)
                    .map(|(compiled, _)| compiled.clone()),
            };
            if let Some(compiled) = hit {
                return Ok(Ok(compiled));
            }
            inner.generation
        };
        let Some(record) = load().await? else {
            return Ok(Err(RenderError::new(
                "template.id",
                format!(
                    "unknown template `{id}`{}",
                    version.map(|v| format!(" version {v}")).unwrap_or_default()
                ),
            )));
        };
        let compiled = match TemplateDefinition::from_json(record.definition)
            .and_then(|definition| CompiledTemplate::compile(definition, record.version))
        {
            Ok(compiled) => Arc::new(compiled),
            Err(error) => return Ok(Err(error)),
        };
        let mut inner = self.lock();
        match version {
            Some(v) => {
                if inner.pinned.len() >= PINNED_MAX {
                    inner.pinned.clear();
                }
                inner
                    .pinned
                    .insert((tenant.to_string(), id.to_string(), v), compiled.clone());
            }
            None if inner.generation == generation && self.listening.load(Ordering::SeqCst) => {
                inner.published.insert(
                    (tenant.to_string(), id.to_string()),
                    (compiled.clone(), Instant::now()),
                );
            }
            None => {}
        }
        Ok(Ok(compiled))
    }

    /// Drops what is cached of a template (its published pointer moved).
    pub fn invalidate(&self, tenant: &str, id: &str) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner
            .published
            .remove(&(tenant.to_string(), id.to_string()));
        inner
            .pinned
            .retain(|(t, i, _), _| !(t == tenant && i == id));
    }

    /// Applies control messages from `consumer` (a private queue on the control exchange)
    /// until `stop`. When the subscription is lost, so are the announcements published
    /// meanwhile: published templates are read from the database, uncached, until `broker`
    /// has subscribed again, and the cache starts empty.
    pub async fn listen(
        &self,
        mut consumer: herald_amqp::Consumer,
        broker: herald_amqp::Broker,
        stop: CancellationToken,
    ) {
        let control = broker.topology().control_exchange();
        loop {
            self.listening.store(true, Ordering::SeqCst);
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => break,
                    next = consumer.next() => next,
                };
                match next {
                    Some(Ok(delivery)) => match serde_json::from_slice(&delivery.data) {
                        Ok(ControlMessage::TemplatePublished {
                            tenant,
                            template,
                            version,
                        }) => {
                            tracing::debug!(%tenant, %template, version, "template published; cache dropped");
                            self.invalidate(&tenant, &template);
                        }
                        Err(error) => tracing::warn!(%error, "unreadable control message"),
                    },
                    Some(Err(error)) => {
                        tracing::warn!(%error, "control subscription lost; published templates are not cached until it is back");
                        break;
                    }
                    None => break,
                }
            }
            self.forget_published();
            let mut pauses = std::iter::successors(Some(Duration::from_millis(250)), |p| {
                Some((*p * 2).min(Duration::from_secs(5)))
            });
            consumer = loop {
                let pause = pauses.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                match broker.subscribe_temporary(&control, "#").await {
                    Ok(consumer) => break consumer,
                    Err(error) => tracing::debug!(%error, "control subscription not back yet"),
                }
            };
            tracing::info!("control subscription back; caching published templates again");
        }
    }

    /// Stops caching published templates and drops those cached.
    fn forget_published(&self) {
        self.listening.store(false, Ordering::SeqCst);
        let mut inner = self.lock();
        inner.generation += 1;
        inner.published.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn record(version: i32) -> TemplateRecord {
        TemplateRecord {
            id: "t".into(),
            version,
            definition: serde_json::json!({
                "id": "t",
                "channels": {"feishu": {"msg_type": "text", "text": format!("v{version}")}}
            }),
        }
    }

    /// Gets `t` through `cache`, loading `version` (and counting loads) on a miss.
    async fn get(
        cache: &TemplateCache,
        pinned: Option<i32>,
        version: i32,
        loads: &AtomicUsize,
    ) -> i32 {
        cache
            .get_or_load("tenant", "t", pinned, || async {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(Some(record(version)))
            })
            .await
            .expect("no store error")
            .expect("compiles")
            .version
    }

    #[tokio::test]
    async fn published_versions_are_cached_until_announced() {
        let cache = TemplateCache::default();
        cache.listening.store(true, Ordering::SeqCst);
        let loads = AtomicUsize::new(0);
        assert_eq!(get(&cache, None, 1, &loads).await, 1);
        assert_eq!(get(&cache, None, 2, &loads).await, 1, "cached");
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        cache.invalidate("tenant", "t");
        assert_eq!(
            get(&cache, None, 2, &loads).await,
            2,
            "reloaded after the announcement"
        );
        // Another tenant's template of the same id is another entry.
        cache.invalidate("other", "t");
        assert_eq!(get(&cache, None, 3, &loads).await, 2);
    }

    #[tokio::test]
    async fn nothing_published_is_cached_while_not_listening() {
        let cache = TemplateCache::default();
        let loads = AtomicUsize::new(0);
        get(&cache, None, 1, &loads).await;
        get(&cache, None, 1, &loads).await;
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        // Pinned versions never change, so they are cached anyway.
        get(&cache, Some(1), 1, &loads).await;
        get(&cache, Some(1), 1, &loads).await;
        assert_eq!(loads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_load_that_raced_an_announcement_is_not_cached() {
        let cache = TemplateCache::default();
        cache.listening.store(true, Ordering::SeqCst);
        let version = cache
            .get_or_load("tenant", "t", None, || async {
                // The pointer moves while the old version is being read.
                cache.invalidate("tenant", "t");
                Ok(Some(record(1)))
            })
            .await
            .expect("no store error")
            .expect("compiles")
            .version;
        assert_eq!(version, 1, "this request renders what it read");
        let loads = AtomicUsize::new(0);
        assert_eq!(
            get(&cache, None, 2, &loads).await,
            2,
            "the next one reads again"
        );
    }
}
