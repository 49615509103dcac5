//! The map from Nomad task id to the per-task handle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Tasks known to this plugin process, keyed by Nomad task id
/// (`<alloc id>/<task name>/<8 hex digits>`).
///
/// The lock is held only to read or change the map, never across an await, so a slow RPC on
/// one task never blocks another.
#[derive(Debug)]
pub struct TaskStore<T> {
    tasks: Mutex<HashMap<String, Arc<T>>>,
}

impl<T> Default for TaskStore<T> {
    fn default() -> Self {
        Self {
            tasks: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> TaskStore<T> {
    /// Returns the handle of `task_id`, if known.
    pub fn get(&self, task_id: &str) -> Option<Arc<T>> {
        self.lock().get(task_id).cloned()
    }

    /// Adds `handle` under `task_id` unless the id is taken, in which case the existing handle
    /// is returned as the error, so that a repeated StartTask can return it.
    pub fn insert(&self, task_id: &str, handle: Arc<T>) -> Result<(), Arc<T>> {
        let mut tasks = self.lock();
        if let Some(existing) = tasks.get(task_id) {
            return Err(Arc::clone(existing));
        }
        tasks.insert(task_id.to_owned(), handle);
        Ok(())
    }

    /// Removes and returns the handle of `task_id`, if known.
    pub fn remove(&self, task_id: &str) -> Option<Arc<T>> {
        self.lock().remove(task_id)
    }

    /// Returns the number of known tasks.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Returns whether no task is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<T>>> {
        // The map is changed by single calls that cannot leave it half-updated, so a poisoned
        // lock still guards a consistent map.
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_insert_get_remove() {
        let store = TaskStore::default();
        assert!(store.is_empty());

        store.insert("a/web/01", Arc::new(1)).expect("new id");
        assert_eq!(store.get("a/web/01").as_deref(), Some(&1));
        assert_eq!(store.len(), 1);

        assert_eq!(store.remove("a/web/01").as_deref(), Some(&1));
        assert!(store.get("a/web/01").is_none());
        assert!(store.remove("a/web/01").is_none());
    }

    #[test]
    fn store_insert_keeps_existing() {
        let store = TaskStore::default();
        store.insert("a/web/01", Arc::new(1)).expect("new id");

        let existing = store.insert("a/web/01", Arc::new(2)).unwrap_err();
        assert_eq!(*existing, 1);
        assert_eq!(store.get("a/web/01").as_deref(), Some(&1));
    }
}
