//! One run's verified chunks that are not yet in a durable, indexed pack: what
//! `MissingChunks` must not ask for again, what the next pack holds, and what each chunk
//! weighed in plaintext. Pure: no I/O, no clock, so its rules are unit-tested here.

use std::collections::{HashMap, HashSet};

use lifeboat_shared::ids::{ChunkId, TenantId};
use lifeboat_shared::pack::PackBuilder;

#[derive(Debug)]
pub struct RunChunks {
    pub tenant: TenantId,
    pack: PackBuilder,
    /// Everything not yet indexed: in `pack`, or in a pack being written.
    pending: HashSet<ChunkId>,
    plain_len: HashMap<ChunkId, u32>,
    /// Plaintext bytes of the chunks this run uploaded that were new to it.
    pub uploaded_plain_bytes: u64,
}

impl RunChunks {
    pub fn new(tenant: TenantId, pack: PackBuilder) -> Self {
        Self { tenant, pack, pending: HashSet::new(), plain_len: HashMap::new(), uploaded_plain_bytes: 0 }
    }

    /// Adds a verified chunk to the next pack unless the run already holds it; true if it
    /// was new.
    pub fn add(&mut self, id: ChunkId, blob: &[u8], plain_len: u32) -> bool {
        if !self.pending.insert(id) {
            return false;
        }
        self.pack.push(id, blob);
        self.plain_len.insert(id, plain_len);
        self.uploaded_plain_bytes += u64::from(plain_len);
        true
    }

    /// Bytes in the next pack.
    pub fn pack_len(&self) -> usize {
        self.pack.len()
    }

    /// Of `ids`, those neither `indexed` nor pending in this run, each once, in order.
    pub fn missing(&self, ids: Vec<ChunkId>, indexed: &HashSet<ChunkId>) -> Vec<ChunkId> {
        let mut seen = HashSet::new();
        ids.into_iter().filter(|id| !indexed.contains(id) && !self.pending.contains(id) && seen.insert(*id)).collect()
    }

    /// Takes the next pack (if it holds anything) with each entry's plaintext length,
    /// leaving `fresh` in its place. Its chunks stay pending until [`Self::release`].
    pub fn take_pack(&mut self, fresh: PackBuilder) -> Option<(PackBuilder, Vec<u32>)> {
        if self.pack.is_empty() {
            return None;
        }
        let pack = std::mem::replace(&mut self.pack, fresh);
        let lens = pack.entries().iter().map(|e| self.plain_len.get(&e.id).copied().unwrap_or(0)).collect();
        Some((pack, lens))
    }

    /// The chunks of a written pack stop being pending: indexed now, or (after a failed
    /// write) missing again, so the agent is asked for them again.
    pub fn release(&mut self, ids: &[ChunkId]) {
        for id in ids {
            self.pending.remove(id);
            self.plain_len.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn chunks() -> RunChunks {
        RunChunks::new(TenantId(uuid::Uuid::nil()), PackBuilder::new())
    }

    #[test]
    fn a_chunk_is_packed_once_and_counted_once() {
        let mut c = chunks();
        assert!(c.add(id(1), b"blob-1", 100));
        assert!(!c.add(id(1), b"blob-1", 100), "a second upload of the same chunk is not packed again");
        assert!(c.add(id(2), b"blob-22", 200));
        assert_eq!(c.uploaded_plain_bytes, 300);
        let (pack, lens) = c.take_pack(PackBuilder::new()).unwrap();
        assert_eq!(pack.entries().iter().map(|e| e.id).collect::<Vec<_>>(), vec![id(1), id(2)]);
        assert_eq!(lens, vec![100, 200]);
        assert!(c.take_pack(PackBuilder::new()).is_none(), "an empty pack is not written");
    }

    #[test]
    fn pending_chunks_are_not_missing_until_released() {
        let mut c = chunks();
        c.add(id(1), b"a", 1);
        let (_pack, _) = c.take_pack(PackBuilder::new()).unwrap();
        let indexed: HashSet<ChunkId> = [id(3)].into();
        // Being written: not asked for again. Indexed: not asked. Asked twice: once.
        assert_eq!(c.missing(vec![id(1), id(2), id(3), id(2)], &indexed), vec![id(2)]);
        // A failed write releases its chunks: they are missing again.
        c.release(&[id(1)]);
        assert_eq!(c.missing(vec![id(1), id(2)], &indexed), vec![id(1), id(2)]);
    }
}
