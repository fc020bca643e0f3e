//! Which cached objects belong to which ClusteredService, so a reconcile
//! reads its own pods and EndpointSlices instead of scanning the whole
//! fleet's (kube's `Store` has no index: `state()` copies every entry).
//!
//! Kept from the same watch events as the store, with the same semantics:
//! a re-list replaces the index at its end, so objects deleted while the
//! watch was down leave it too.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, RwLock};

use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::Event;

/// The key an object is indexed under (its ClusteredService, for one).
pub type KeyOf<K, Key> = fn(&K) -> Option<Key>;

/// The members of each key, and each member's key (so a relabelled object
/// moves).
struct Members<K: Resource<DynamicType = ()>, Key> {
    by_key: HashMap<Key, HashSet<ObjectRef<K>>>,
    key_of: HashMap<ObjectRef<K>, Key>,
}

impl<K: Resource<DynamicType = ()>, Key> Default for Members<K, Key> {
    fn default() -> Self {
        Self { by_key: HashMap::new(), key_of: HashMap::new() }
    }
}

impl<K, Key> Members<K, Key>
where
    K: Resource<DynamicType = ()>,
    Key: Eq + Hash + Clone,
{
    fn insert(&mut self, object: ObjectRef<K>, key: Option<Key>) {
        self.remove(&object);
        if let Some(key) = key {
            self.by_key.entry(key.clone()).or_default().insert(object.clone());
            self.key_of.insert(object, key);
        }
    }

    fn remove(&mut self, object: &ObjectRef<K>) {
        let Some(key) = self.key_of.remove(object) else { return };
        if let Some(members) = self.by_key.get_mut(&key) {
            members.remove(object);
            if members.is_empty() {
                self.by_key.remove(&key);
            }
        }
    }
}

/// The index and the re-list being gathered, behind one lock.
struct State<K: Resource<DynamicType = ()>, Key> {
    live: Members<K, Key>,
    relisting: Option<Members<K, Key>>,
}

/// A store's objects grouped by a key.
pub struct Index<K: Resource<DynamicType = ()> + 'static, Key> {
    store: Store<K>,
    key: KeyOf<K, Key>,
    state: Arc<RwLock<State<K, Key>>>,
}

impl<K: Resource<DynamicType = ()> + 'static, Key> Clone for Index<K, Key> {
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), key: self.key, state: Arc::clone(&self.state) }
    }
}

impl<K, Key> Index<K, Key>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
    Key: Eq + Hash + Clone,
{
    pub fn new(store: Store<K>, key: KeyOf<K, Key>) -> Self {
        let state = State { live: Members::default(), relisting: None };
        Self { store, key, state: Arc::new(RwLock::new(state)) }
    }

    /// Follows one watch event (after the store has).
    pub fn apply(&self, event: &Event<K>) {
        let mut state = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        match event {
            Event::Apply(object) => state.live.insert(ObjectRef::from(object), (self.key)(object)),
            Event::Delete(object) => state.live.remove(&ObjectRef::from(object)),
            Event::Init => state.relisting = Some(Members::default()),
            Event::InitApply(object) => {
                let key = (self.key)(object);
                state.relisting.get_or_insert_with(Members::default).insert(ObjectRef::from(object), key);
            }
            Event::InitDone => {
                if let Some(relisted) = state.relisting.take() {
                    state.live = relisted;
                }
            }
        }
    }

    /// The cached objects under `key`.
    pub fn get(&self, key: &Key) -> Vec<Arc<K>> {
        let state = self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(members) = state.live.by_key.get(key) else { return Vec::new() };
        members.iter().filter_map(|object| self.store.get(object)).collect()
    }

    /// The store behind the index (for waiting until it is listed).
    pub fn store(&self) -> &Store<K> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ObjectMeta;
    use kube::runtime::reflector;

    fn pod(name: &str, service: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some([("svc".to_string(), service.to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn service_of(pod: &Pod) -> Option<String> {
        pod.metadata.labels.as_ref()?.get("svc").cloned()
    }

    /// The store and the index fed the same events, as the watch does.
    fn feed(events: Vec<Event<Pod>>) -> Index<Pod, String> {
        let (reader, mut writer) = reflector::store();
        let index = Index::new(reader, service_of as KeyOf<Pod, String>);
        for event in events {
            writer.apply_watcher_event(&event);
            index.apply(&event);
        }
        index
    }

    fn names(index: &Index<Pod, String>, key: &str) -> Vec<String> {
        let mut names: Vec<String> =
            index.get(&key.to_string()).iter().filter_map(|p| p.metadata.name.clone()).collect();
        names.sort();
        names
    }

    #[test]
    fn objects_are_found_under_their_key_only() {
        let index = feed(vec![
            Event::Init,
            Event::InitApply(pod("a-1", "a")),
            Event::InitApply(pod("b-1", "b")),
            Event::InitDone,
            Event::Apply(pod("a-2", "a")),
        ]);
        assert_eq!(names(&index, "a"), ["a-1", "a-2"]);
        assert_eq!(names(&index, "b"), ["b-1"]);
        assert!(names(&index, "c").is_empty());
    }

    #[test]
    fn deleted_and_relabelled_objects_leave_their_old_key() {
        let index = feed(vec![
            Event::Apply(pod("a-1", "a")),
            Event::Apply(pod("a-2", "a")),
            Event::Delete(pod("a-1", "a")),
            Event::Apply(pod("a-2", "b")),
        ]);
        assert!(names(&index, "a").is_empty());
        assert_eq!(names(&index, "b"), ["a-2"]);
    }

    #[test]
    fn a_relist_drops_what_was_deleted_while_the_watch_was_down() {
        let before = vec![Event::Apply(pod("a-1", "a")), Event::Apply(pod("a-2", "a")), Event::Init];
        let relisted = [Event::InitApply(pod("a-2", "a")), Event::InitApply(pod("b-1", "b"))];
        // Until the re-list ends, the index answers as before it began.
        let during = feed(before.iter().cloned().chain(relisted.iter().cloned()).collect());
        assert_eq!(names(&during, "a"), ["a-1", "a-2"]);
        assert!(names(&during, "b").is_empty());
        let after = feed(before.into_iter().chain(relisted).chain([Event::InitDone]).collect());
        assert_eq!(names(&after, "a"), ["a-2"]);
        assert_eq!(names(&after, "b"), ["b-1"]);
    }
}
