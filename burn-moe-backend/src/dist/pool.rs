//! [`OutputPool`]: collective output buffers kept for reuse (the NCCL communicator's allocator).

/// Output buffers of earlier collectives, kept for the next collective of the same byte size.
///
/// Why: a fresh CubeCL buffer per collective cost 25-370 µs (irregular by size) on an H200, the
/// whole gap to torch's bus bandwidth at 64-256 MiB (BENCHMARKS.md). Parameter and gradient
/// collectives repeat their sizes (every decoder layer gathers tensors of the same shapes), so
/// keeping the buffers and handing them out again skips the allocator. (The NCCL communicator
/// does not pool the token all-to-all's outputs: their sizes follow the routing.)
///
/// A buffer is handed out again only when no tensor holds it any more: the pool keeps a clone of
/// each handle, and CubeCL counts handle clones (`can_mut` is true when, besides CubeCL's own
/// bookkeeping, only one clone is left — ours). Reuse happens after `B::sync` (every collective
/// starts with it), so no queued kernel still reads the memory. The pool holds at most `cap`
/// bytes (least recently handed out dropped first); buffers in use when dropped from the pool
/// simply go back to CubeCL when their tensors do.
#[derive(Debug, Default)]
pub struct OutputPool {
    entries: std::collections::VecDeque<(u64, cubecl::server::Handle)>,
    held: u64,
    cap: u64,
    reused: u64,
}

impl OutputPool {
    /// The default cap: one Mixtral-8x7B decoder layer's expert weights in bf16 (3 × 0.94 GB) and
    /// some room.
    pub const DEFAULT_BYTES: u64 = 4 << 30;

    /// A pool holding at most `cap` bytes.
    pub fn new(cap: u64) -> Self {
        Self { cap, ..Self::default() }
    }

    /// A buffer of `bytes` bytes: a free kept one, else `alloc()` (kept if it fits the cap).
    pub fn take(&mut self, bytes: u64, alloc: impl FnOnce() -> cubecl::server::Handle) -> cubecl::server::Handle {
        if let Some(i) = self.entries.iter().position(|(b, h)| *b == bytes && h.can_mut()) {
            let entry = self.entries.remove(i).expect("index from position");
            let handle = entry.1.clone();
            self.entries.push_back(entry);
            self.reused += 1;
            return handle;
        }
        let handle = alloc();
        if bytes <= self.cap {
            self.entries.push_back((bytes, handle.clone()));
            self.held += bytes;
            while self.held > self.cap {
                let Some((b, _)) = self.entries.pop_front() else { break };
                self.held -= b;
            }
        }
        handle
    }

    /// Its cap in bytes.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Bytes of the buffers it keeps.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// How many [`take`](Self::take)s were served by a kept buffer.
    pub fn reused(&self) -> u64 {
        self.reused
    }
}
