//! A replay of ggml's graph allocator (`ggml/src/ggml-alloc.c`, llama.cpp b-0.3.36 vendor copy)
//! over a tensor graph that has sizes but no data: the compute buffer llama.cpp reserves is the
//! high-water mark this allocator reaches, fragmentation included, so the estimate replays it
//! rather than summing a live set (a sum missed the holes: 0.5-37% low, issue 10).
//!
//! What is kept from ggml, because each changes the figure:
//! - inputs are allocated first, in graph order, before any node, and each is freed after its
//!   last consumer like any other tensor (an input nothing consumes stays to the end);
//! - a node reuses its first parent's memory (in place) when its op can run in place, the
//!   parent is an allocated non-view tensor with this node as its only consumer and no views,
//!   and the two have one size (a view parent never qualifies: ggml marks views unallocated);
//! - a tensor is freed when its last consumer has run and no view of it is left; a view passes
//!   its release to the tensor it views;
//! - `dyn_tallocr`: sizes rounded up to the buffer's alignment; best fit among the free blocks
//!   but the last, else the last (the unbounded tail) block; frees coalesce with neighbours.
//!
//! Cost: a few hundred tensors per layer, O(free blocks) per allocation; microseconds a model.

/// Index of a tensor in a [`Graph`].
pub type Id = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Weights, KV cache: memory of their own, outside the compute buffer.
    External,
    /// A graph input (`ggml_set_input`): allocated before every node.
    Input,
    /// An op writing a new tensor; `inplace`: `ggml_op_can_inplace` for its op.
    Op { inplace: bool },
    /// A view (reshape, permute, view, transpose, and set_rows' result) of `base`.
    View { base: Id },
}

/// The most sources a node here has (flash attention: q, k, v, mask), as in ggml (10).
const MAX_SRC: usize = 4;

#[derive(Debug, Clone)]
struct Tensor {
    kind: Kind,
    bytes: u64,
    /// Inline: a graph has ~40 tensors a layer, and a fuzzed header may claim 65536 layers.
    src: [Id; MAX_SRC],
    n_src: u8,
}

impl Tensor {
    fn srcs(&self) -> &[Id] {
        &self.src[..self.n_src as usize]
    }
}

/// A graph in execution order: inputs and externals first by construction, nodes as added.
#[derive(Debug, Default, Clone)]
pub struct Graph {
    tensors: Vec<Tensor>,
}

impl Graph {
    fn push(&mut self, kind: Kind, bytes: u64, srcs: &[Id]) -> Id {
        let mut src = [0; MAX_SRC];
        src[..srcs.len()].copy_from_slice(srcs);
        self.tensors.push(Tensor {
            kind,
            bytes,
            src,
            n_src: srcs.len() as u8,
        });
        self.tensors.len() - 1
    }
    /// A weight or cache tensor (not in the compute buffer).
    pub fn external(&mut self) -> Id {
        self.push(Kind::External, 0, &[])
    }
    /// A graph input of `bytes`.
    pub fn input(&mut self, bytes: u64) -> Id {
        self.push(Kind::Input, bytes, &[])
    }
    /// An op that cannot run in place (mul_mat, get_rows, cont, glu, flash_attn_ext, ...).
    pub fn op(&mut self, bytes: u64, srcs: &[Id]) -> Id {
        self.push(Kind::Op { inplace: false }, bytes, srcs)
    }
    /// An op ggml may run in its first fitting parent's memory (add, mul, scale, rms_norm,
    /// rope, soft_max, unary): same size as `srcs[0]`.
    pub fn inplace(&mut self, srcs: &[Id]) -> Id {
        let bytes = self.tensors[srcs[0]].bytes;
        self.push(Kind::Op { inplace: true }, bytes, srcs)
    }
    /// A view of `src` (reshape, permute, view, transpose), or an op whose result is a view
    /// (`set_rows` into the cache: `srcs` are what it reads).
    pub fn view(&mut self, src: Id, srcs: &[Id]) -> Id {
        let base = match self.tensors[src].kind {
            Kind::View { base } => base,
            _ => src,
        };
        let mut all = [src; MAX_SRC];
        all[1..=srcs.len()].copy_from_slice(srcs);
        self.push(Kind::View { base }, 0, &all[..=srcs.len()])
    }

    /// The inputs' bytes, each rounded to `align`.
    pub fn inputs_bytes(&self, align: u64) -> u64 {
        let a = Arena::new(align);
        self.tensors
            .iter()
            .filter(|t| t.kind == Kind::Input)
            .fold(0u64, |sum, t| sum.saturating_add(a.round(t.bytes)))
    }

    /// The buffer ggml-alloc would reserve for this graph, with `align`-byte alignment.
    pub fn reserve(&self, align: u64) -> u64 {
        let n = self.tensors.len();
        let mut children = vec![0u32; n];
        let mut views = vec![0u32; n];
        for t in &self.tensors {
            if let Kind::View { base } = t.kind {
                views[base] += 1;
            }
            for &s in t.srcs() {
                children[s] += 1;
            }
        }
        let mut arena = Arena::new(align);
        let mut addr: Vec<Option<u64>> = vec![None; n];
        for (i, t) in self.tensors.iter().enumerate() {
            if t.kind == Kind::Input {
                addr[i] = Some(arena.alloc(t.bytes));
            }
        }
        for (i, t) in self.tensors.iter().enumerate() {
            match t.kind {
                Kind::Op { inplace } => {
                    let reuse = inplace
                        .then(|| {
                            t.srcs().iter().copied().find(|&p| {
                                addr[p].is_some()
                                    && !matches!(self.tensors[p].kind, Kind::View { .. })
                                    && children[p] == 1
                                    && views[p] == 0
                                    && self.tensors[p].bytes == t.bytes
                            })
                        })
                        .flatten();
                    addr[i] = match reuse {
                        Some(p) => addr[p].take(),
                        None => Some(arena.alloc(t.bytes)),
                    };
                }
                Kind::External | Kind::Input | Kind::View { .. } => {}
            }
            for &p in t.srcs() {
                children[p] -= 1;
                if children[p] != 0 || views[p] != 0 {
                    continue;
                }
                let owner = match self.tensors[p].kind {
                    Kind::View { base } => {
                        views[base] -= 1;
                        if views[base] != 0 || children[base] != 0 {
                            continue;
                        }
                        base
                    }
                    _ => p,
                };
                if let Some(a) = addr[owner].take() {
                    arena.free(a, self.tensors[owner].bytes);
                }
            }
        }
        arena.max_size
    }
}

/// ggml's `ggml_dyn_tallocr` for one chunk (CPU and CUDA buffers have no size cap).
struct Arena {
    align: u64,
    /// Sorted by offset; the last block is the unbounded tail.
    free: Vec<(u64, u64)>,
    max_size: u64,
}

impl Arena {
    fn new(align: u64) -> Arena {
        Arena {
            align: align.max(1),
            free: vec![(0, u64::MAX / 2)],
            max_size: 0,
        }
    }

    fn round(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.align).saturating_mul(self.align)
    }

    fn alloc(&mut self, bytes: u64) -> u64 {
        let size = self.round(bytes);
        let last = self.free.len() - 1;
        // Best fit among all but the last block; ties go to the later block, as in ggml (`<=`).
        let mut best: Option<usize> = None;
        for i in 0..last {
            let s = self.free[i].1;
            if s >= size && best.map_or(true, |b| s <= self.free[b].1) {
                best = Some(i);
            }
        }
        let i = best.unwrap_or(last);
        let (off, s) = self.free[i];
        if s < size {
            // Only a lying header asks for more than half the address space: report that.
            self.max_size = u64::MAX;
            return off;
        }
        if s == size {
            self.free.remove(i);
        } else {
            self.free[i] = (off.saturating_add(size), s - size);
        }
        self.max_size = self.max_size.max(off.saturating_add(size));
        off
    }

    /// Gives a block back, merging it with the free neighbours it touches (saturating: a
    /// lying header's sizes must not panic).
    fn free(&mut self, off: u64, bytes: u64) {
        let size = self.round(bytes);
        let end = |b: (u64, u64)| b.0.saturating_add(b.1);
        for i in 0..self.free.len() {
            let b = self.free[i];
            if end(b) == off {
                self.free[i].1 = b.1.saturating_add(size);
                if i + 1 < self.free.len() && end(self.free[i]) == self.free[i + 1].0 {
                    self.free[i].1 = self.free[i].1.saturating_add(self.free[i + 1].1);
                    self.free.remove(i + 1);
                }
                return;
            }
            if off.saturating_add(size) == b.0 {
                self.free[i] = (off, b.1.saturating_add(size));
                if i > 0 && end(self.free[i - 1]) == off {
                    self.free[i - 1].1 = self.free[i - 1].1.saturating_add(self.free[i].1);
                    self.free.remove(i);
                }
                return;
            }
        }
        let at = self.free.partition_point(|b| b.0 < off);
        self.free.insert(at, (off, size));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_place_ops_share_their_parents_memory() {
        let mut g = Graph::default();
        let w = g.external();
        let a = g.op(100, &[w]);
        let b = g.inplace(&[a]); // a's only consumer: same memory
        let c = g.inplace(&[b, w]);
        g.op(100, &[c]);
        // a/b/c at 0..128 (32-byte rounding), the last op beside them.
        assert_eq!(g.reserve(32), 256);
    }

    #[test]
    fn a_view_keeps_its_base_alive_and_holes_are_best_fit() {
        let mut g = Graph::default();
        let w = g.external();
        let a = g.op(64, &[w]); // 0..64
        let v = g.view(a, &[]); // rope of a reshape: never in place
        let b = g.inplace(&[v]); // 64..128
        let big = g.op(256, &[b]); // b freed after: 0..128 is one hole; big at 128..384
        g.op(128, &[big]); // fits the hole
        assert_eq!(g.reserve(32), 384);
    }

    #[test]
    fn absurd_sizes_saturate_instead_of_panicking() {
        let mut g = Graph::default();
        let a = g.input(u64::MAX - 5);
        let b = g.op(u64::MAX / 3, &[a]);
        g.op(7, &[b]);
        assert_eq!(g.reserve(128), u64::MAX);
    }

    #[test]
    fn inputs_come_first_and_are_freed_after_their_last_use() {
        let mut g = Graph::default();
        let i = g.input(1000);
        let x = g.op(1000, &[i]); // 1024..2048; the input's 0..1024 freed after
        g.op(1000, &[x]); // into the input's hole
        assert_eq!(g.reserve(32), 2048);
        assert_eq!(g.inputs_bytes(32), 1024);
    }
}
