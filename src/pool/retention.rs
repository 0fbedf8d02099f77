//! Sessions left unused for `session_ttl` leave a durable store: the ones still in the
//! pool's memory expire there (and are closed, journal included); this sweeps those
//! only the store holds.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crate::pool::{PoolEvent, Shared};

impl Shared {
    /// Starts removing up to `most` stored sessions unused for `ttl` and not in the
    /// pool's memory, unless a sweep is still running.
    pub(crate) fn sweep_store(self: &Arc<Self>, ttl: Duration, most: usize) {
        if !self.journal.durable() || self.sweeping_store.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            shared.remove_unused(ttl, most).await;
            shared.sweeping_store.store(false, Ordering::Release);
        });
    }

    async fn remove_unused(&self, ttl: Duration, most: usize) {
        let Some(before) = SystemTime::now().checked_sub(ttl) else {
            return;
        };
        let unused = match self.journal.unused_since(before, most).await {
            Ok(unused) => unused,
            Err(error) => {
                tracing::warn!(%error, "cannot look for unused sessions in the journal store");
                return;
            }
        };
        for (id, epoch) in unused {
            // One in memory is the pool's to expire; one taken over since has a newer
            // epoch and stays.
            if self.lock().sessions.get(&id).is_some() {
                continue;
            }
            match self.journal.remove(&id, Some(epoch)).await {
                Ok(true) => {
                    tracing::debug!(session = %id, "stored session expired");
                    self.notify(PoolEvent::SessionExpired {
                        session_id: Arc::from(id),
                    });
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(session = %id, %error, "removing an expired session from the journal store failed");
                }
            }
        }
    }
}
