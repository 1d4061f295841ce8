//! Prefix caching: the keys and values of full prompt blocks outlive their sequence, so a later
//! prompt that starts with the same tokens (a system prompt, few-shot examples) copies them
//! instead of recomputing them, and prefills only the rest.
//!
//! A block is found by a hash chain: block `i`'s key hashes block `i - 1`'s key with its own
//! tokens, and the first block's starts from the scope, so a key names the whole prefix up to
//! the block's end, as in vLLM. Only full blocks are kept, because a partial one would change
//! as its prompt grows. Every hit is checked against the tokens, parent and scope the entry
//! stores, so a hash collision costs a miss, never a wrong answer.
//!
//! The scope is what else changes the keys and values: the adapter. The base model is one per
//! server. An adapter with a registry digest is scoped by it (a reload of the same version
//! shares its blocks); one without is scoped by its loaded instance, since its name says
//! nothing about its weights after a hot swap. The instance's address is its identity, and a
//! `Weak` held by each of its blocks keeps that address from being reused while they exist.
//!
//! Blocks are evicted least recently used first; a lookup or an insert marks its whole chain
//! used at once, and among blocks used at once the deepest goes first, so a chain is cut from
//! its end and no block outlives the ones it extends.

use crate::adapters::LoadedAdapter;
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Weak};

/// What the keys and values of a prompt depend on besides its tokens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ScopeId {
    Base,
    Digest(String),
    Instance(usize),
}

/// A request's scope, with what keeps an adapter instance's identity valid.
#[derive(Clone)]
pub(super) struct Scope {
    id: ScopeId,
    instance: Option<Weak<LoadedAdapter>>,
}

impl Scope {
    pub(super) fn of(adapter: Option<&Arc<LoadedAdapter>>) -> Self {
        match adapter {
            None => Self {
                id: ScopeId::Base,
                instance: None,
            },
            Some(a) => match &a.digest {
                Some(digest) => Self {
                    id: ScopeId::Digest(digest.clone()),
                    instance: None,
                },
                None => Self {
                    id: ScopeId::Instance(Arc::as_ptr(a) as usize),
                    instance: Some(Arc::downgrade(a)),
                },
            },
        }
    }

    fn root_key(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.id.hash(&mut h);
        h.finish()
    }
}

struct Entry<K> {
    scope: ScopeId,
    /// Keeps an adapter instance's address from being reused while this block exists.
    _instance: Option<Weak<LoadedAdapter>>,
    parent: Option<u64>,
    tokens: Box<[u32]>,
    depth: usize,
    last_used: u64,
    kv: K,
}

pub(super) struct PrefixCache<K> {
    block_tokens: usize,
    entries: HashMap<u64, Entry<K>>,
    /// (last used, deeper first, key): the first is the next to evict.
    order: BTreeSet<(u64, Reverse<usize>, u64)>,
    clock: u64,
}

/// A prompt's blocks, with the key of each: the key of a block covers it and all before it.
struct Chain<'a> {
    keys: Vec<u64>,
    blocks: Vec<&'a [u32]>,
}

impl<K> PrefixCache<K> {
    pub(super) fn new(block_tokens: usize) -> Self {
        Self {
            block_tokens: block_tokens.max(1),
            entries: HashMap::new(),
            order: BTreeSet::new(),
            clock: 0,
        }
    }

    /// Blocks held.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    fn chain<'a>(&self, scope: &Scope, tokens: &'a [u32]) -> Chain<'a> {
        let blocks: Vec<&[u32]> = tokens.chunks_exact(self.block_tokens).collect();
        let mut keys = Vec::with_capacity(blocks.len());
        let mut key = scope.root_key();
        for block in &blocks {
            let mut h = DefaultHasher::new();
            key.hash(&mut h);
            block.hash(&mut h);
            key = h.finish();
            keys.push(key);
        }
        Chain { keys, blocks }
    }

    /// Whether the entry under `key` is block `depth` of this chain (not a hash collision).
    fn matches(&self, key: u64, scope: &Scope, chain: &Chain<'_>, depth: usize) -> bool {
        let parent = depth.checked_sub(1).map(|d| chain.keys[d]);
        self.entries
            .get(&key)
            .is_some_and(|e| e.scope == scope.id && e.parent == parent && *e.tokens == *chain.blocks[depth])
    }

    /// The cached blocks that start `tokens`, at most `max_blocks` of them, in order; they are
    /// marked used.
    pub(super) fn lookup(&mut self, scope: &Scope, tokens: &[u32], max_blocks: usize) -> Vec<u64> {
        let chain = self.chain(scope, tokens);
        let mut hit = Vec::new();
        for (depth, &key) in chain.keys.iter().enumerate().take(max_blocks) {
            if !self.matches(key, scope, &chain, depth) {
                break;
            }
            hit.push(key);
        }
        self.clock += 1;
        for &key in &hit {
            self.touch(key);
        }
        hit
    }

    /// The keys and values of the blocks under `keys` that are still held, stopping at the
    /// first one evicted since its lookup.
    pub(super) fn blocks(&self, keys: &[u64]) -> Vec<&K> {
        keys.iter().map_while(|k| self.entries.get(k).map(|e| &e.kv)).collect()
    }

    fn touch(&mut self, key: u64) {
        let clock = self.clock;
        if let Some(e) = self.entries.get_mut(&key) {
            self.order.remove(&(e.last_used, Reverse(e.depth), key));
            e.last_used = clock;
            self.order.insert((clock, Reverse(e.depth), key));
        }
    }

    /// Evicts the least recently used block; false when none is held.
    pub(super) fn evict_one(&mut self) -> bool {
        self.evict_used_before(u64::MAX)
    }

    /// Evicts the least recently used block if it was last used before `clock`.
    fn evict_used_before(&mut self, clock: u64) -> bool {
        let Some(&first) = self.order.first() else { return false };
        if first.0 >= clock {
            return false;
        }
        self.order.remove(&first);
        self.entries.remove(&first.2);
        true
    }

    /// Keeps the full blocks of `tokens` that are not held yet, while the cache may hold
    /// `room` blocks in all: blocks used before this insert are evicted to make room, never
    /// this prompt's own. `copy(start, len)` copies the positions out of the sequence's cache;
    /// when it fails, the rest of the prompt is not kept. Returns the blocks added.
    pub(super) fn insert(
        &mut self,
        scope: &Scope,
        tokens: &[u32],
        room: usize,
        mut copy: impl FnMut(usize, usize) -> Option<K>,
    ) -> usize {
        let chain = self.chain(scope, tokens);
        self.clock += 1;
        let mut added = 0;
        for (depth, &key) in chain.keys.iter().enumerate() {
            if self.matches(key, scope, &chain, depth) {
                self.touch(key);
                continue;
            }
            if self.entries.contains_key(&key) {
                // A hash collision with another prefix: keep the one held.
                break;
            }
            while self.len() >= room {
                if !self.evict_used_before(self.clock) {
                    return added;
                }
            }
            let Some(kv) = copy(depth * self.block_tokens, self.block_tokens) else {
                return added;
            };
            let entry = Entry {
                scope: scope.id.clone(),
                _instance: scope.instance.clone(),
                parent: depth.checked_sub(1).map(|d| chain.keys[d]),
                tokens: chain.blocks[depth].into(),
                depth,
                last_used: self.clock,
                kv,
            };
            self.order.insert((self.clock, Reverse(depth), key));
            self.entries.insert(key, entry);
            added += 1;
        }
        added
    }
}

#[cfg(test)]
mod tests {
    use super::{PrefixCache, Scope};

    fn prompt(len: u32) -> Vec<u32> {
        (0..len).collect()
    }

    /// A cache of 4-token blocks whose values are the blocks' start positions.
    fn cache_with(tokens: &[u32], room: usize) -> PrefixCache<usize> {
        let mut cache = PrefixCache::new(4);
        cache.insert(&Scope::of(None), tokens, room, |start, _| Some(start));
        cache
    }

    #[test]
    fn only_full_blocks_are_kept_and_a_lookup_returns_the_longest_chain_that_starts_the_prompt() {
        let mut cache = cache_with(&prompt(14), 100);
        assert_eq!(cache.len(), 3, "14 tokens hold three full blocks of 4");
        let mut longer = prompt(12);
        longer.extend([90, 91, 92, 93, 94]);
        let hit = cache.lookup(&Scope::of(None), &longer, usize::MAX);
        assert_eq!(cache.blocks(&hit), [&0, &4, &8]);
        let mut diverging = prompt(6);
        diverging.extend([70; 10]);
        let hit = cache.lookup(&Scope::of(None), &diverging, usize::MAX);
        assert_eq!(cache.blocks(&hit), [&0], "the second block differs");
        let hit = cache.lookup(&Scope::of(None), &prompt(14), 2);
        assert_eq!(hit.len(), 2, "no more than asked");
    }

    #[test]
    fn a_block_is_found_only_after_the_same_tokens_before_it() {
        let cache = &mut cache_with(&prompt(8), 100);
        let mut shifted = vec![99, 99, 99, 99];
        shifted.extend(4..8);
        let hit = cache.lookup(&Scope::of(None), &shifted, usize::MAX);
        assert!(hit.is_empty(), "block 4..8 after other tokens is another prefix");
    }

    #[test]
    fn eviction_cuts_the_least_recently_used_chain_from_its_end() {
        let mut cache = cache_with(&prompt(12), 100);
        let other: Vec<u32> = (50..58).collect();
        cache.insert(&Scope::of(None), &other, 100, |start, _| Some(100 + start));
        assert!(cache.evict_one());
        let hit = cache.lookup(&Scope::of(None), &prompt(12), usize::MAX);
        assert_eq!(cache.blocks(&hit), [&0, &4], "the older chain lost its last block");
        assert!(cache.evict_one());
        let hit = cache.lookup(&Scope::of(None), &other, usize::MAX);
        assert_eq!(
            cache.blocks(&hit),
            [&100],
            "then the other chain, now older, lost its last"
        );
    }

    #[test]
    fn an_insert_makes_room_by_evicting_other_prompts_blocks_but_never_its_own() {
        let mut cache = cache_with(&prompt(8), 3);
        let other: Vec<u32> = (50..66).collect();
        let added = cache.insert(&Scope::of(None), &other, 3, |start, _| Some(100 + start));
        assert_eq!(added, 3, "both older blocks went, then the room was spent");
        assert!(cache.lookup(&Scope::of(None), &prompt(8), usize::MAX).is_empty());
        let hit = cache.lookup(&Scope::of(None), &other, usize::MAX);
        assert_eq!(cache.blocks(&hit), [&100, &104, &108]);
    }
}
