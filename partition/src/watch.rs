//! Waiting for one invocation: the HTTP ingress for its result, a streaming
//! attempt for what arrives for it. Apply marks the invocations it changes
//! that someone on this node waits for, and once the batch is visible to
//! reads their waiters wake, so that a waiter reads the state only when its
//! invocation changed, not after every batch of its partition.
//!
//! Kept on each node, not replicated, never encoded: it changes nothing that
//! apply computes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The waiters of one group.
#[derive(Debug, Default)]
pub struct Watches {
    inner: Arc<Mutex<Waiters>>,
    /// Waiters registered, so that apply skips the lock when there are none.
    count: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct Waiters {
    next: u64,
    by_id: HashMap<String, Vec<(u64, Arc<Notify>)>>,
    /// Marked by apply; woken once their batch is visible.
    marked: Vec<Arc<Notify>>,
}

impl Watches {
    /// Starts waiting for changes of invocation `id`. A change applied after
    /// this call wakes [`Watch::changed`], even one applied before it is
    /// awaited.
    pub fn watch(&self, id: &str) -> Watch {
        let notify = Arc::new(Notify::new());
        let mut waiters = self.inner.lock().expect("watches lock poisoned");
        let token = waiters.next;
        waiters.next += 1;
        waiters.by_id.entry(id.to_owned()).or_default().push((token, notify.clone()));
        self.count.fetch_add(1, Ordering::Relaxed);
        Watch { id: id.to_owned(), token, notify, inner: self.inner.clone(), count: self.count.clone() }
    }

    /// Apply changed invocation `id` (it completed, or something arrived
    /// for it).
    pub(crate) fn mark(&self, id: &str) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut waiters = self.inner.lock().expect("watches lock poisoned");
        let Waiters { by_id, marked, .. } = &mut *waiters;
        if let Some(list) = by_id.get(id) {
            marked.extend(list.iter().map(|(_, notify)| notify.clone()));
        }
    }

    /// What apply marked is visible to reads now: wakes its waiters.
    pub fn publish(&self) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let marked = std::mem::take(&mut self.inner.lock().expect("watches lock poisoned").marked);
        for notify in marked {
            notify.notify_one();
        }
    }

    /// The whole state was replaced (a snapshot installed): wakes every waiter.
    pub fn publish_all(&self) {
        let mut waiters = self.inner.lock().expect("watches lock poisoned");
        waiters.marked.clear();
        for (_, notify) in waiters.by_id.values().flatten() {
            notify.notify_one();
        }
    }
}

/// Waits for changes of one invocation; stops waiting when dropped.
#[derive(Debug)]
pub struct Watch {
    id: String,
    token: u64,
    notify: Arc<Notify>,
    inner: Arc<Mutex<Waiters>>,
    count: Arc<AtomicUsize>,
}

impl Watch {
    /// Resolves once a change of the invocation since the last call (or
    /// since the watch started) is visible to reads.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiters = self.inner.lock().expect("watches lock poisoned");
        if let Some(list) = waiters.by_id.get_mut(&self.id) {
            list.retain(|(token, _)| *token != self.token);
            if list.is_empty() {
                waiters.by_id.remove(&self.id);
            }
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn woken(watch: &Watch) -> bool {
        tokio::time::timeout(Duration::from_millis(20), watch.changed()).await.is_ok()
    }

    #[tokio::test]
    async fn a_waiter_wakes_once_its_marked_change_is_published() {
        let watches = Watches::default();
        let (a, b) = (watches.watch("inv_a"), watches.watch("inv_b"));
        watches.mark("inv_a");
        assert!(!woken(&a).await, "marked, not yet visible");
        watches.publish();
        assert!(woken(&a).await);
        assert!(!woken(&b).await, "another invocation's change");
        assert!(!woken(&a).await, "one change wakes once");
        // A change published before the waiter awaits is not lost.
        watches.mark("inv_b");
        watches.publish();
        assert!(woken(&b).await);
        watches.publish_all();
        assert!(woken(&a).await && woken(&b).await);
    }

    #[tokio::test]
    async fn a_dropped_watch_is_forgotten() {
        let watches = Watches::default();
        let a = watches.watch("inv_a");
        let again = watches.watch("inv_a");
        drop(a);
        watches.mark("inv_a");
        watches.publish();
        assert!(woken(&again).await);
        drop(again);
        assert_eq!(watches.count.load(Ordering::Relaxed), 0);
        assert!(watches.inner.lock().unwrap().by_id.is_empty());
    }
}
