//! The graph llama.cpp reserves its compute buffer for, tensor by tensor, as its builders make
//! it (vendor llama.cpp of llama-cpp-python 0.3.36: `src/models/llama.cpp`, `gemma2.cpp`,
//! `gemma3.cpp`; `llm_graph_context::build_attn`, `build_attn_mha`, `build_ffn`,
//! `build_inp_embd` in `src/llama-graph.cpp`), at `graph_reserve(n_ubatch, ..)`: one
//! micro-batch, every cache cell visible, every token an output.
//!
//! Sizes, f32 unless said (n = n_ubatch tokens, E = n_embd):
//!
//! ```text
//! inputs   tokens i32 n; inp_embd E x n (kept to the end); k_rot/v_rot f32 (64..hd)^2 when the
//!          cache type is quantized; positions i32 n; per cache (full, sliding): k_idxs i64 n,
//!          v_idxs i64 n (FA) or n x n_head_kv*hd_v (V stored transposed), mask n_kv x n
//!          (f16 with FA, f32 without); out_ids i32 n
//! layer    norm E; Q n_head*hd_k x n (+ rope copy: rope of a reshape view is never in place),
//!          K and V n_head_kv*hd x n (+ rope copy of K; Gemma-3's q/k norms make that in place);
//!          quantized cache: hadamard products of q, k, v and of the output;
//!          no FA: kq n_kv x n x n_head (soft-cap, soft_max in place), kqv and its cont
//!          n_head*hd_v x n; FA: its output n_head*hd_v x n;
//!          attn_out E; ffn norm E; gate, up, glu n_ff x n; down E (adds in place)
//! output   norm in place; logits n_vocab x n
//! ```
//!
//! Order matters as much as size (ggml-alloc's holes depend on it); it is the order llama.cpp's
//! trace shows (`GGML_ALLOCATOR_DEBUG`): Q, V, K for llama, Q, K, V for Gemma. Architectures
//! without a builder here use the llama one.

use super::galloc::{Graph, Id};

/// Which builder's extras apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Llama,
    /// Scaled input, q scale, post-attention and post-FFN norms, attention and logit soft-caps.
    Gemma2,
    /// As Gemma-2 without soft-caps, with q and k RMS norms.
    Gemma3,
}

impl Flavor {
    pub fn of(arch: &str) -> Flavor {
        match arch {
            "gemma2" => Flavor::Gemma2,
            "gemma3" | "gemma-embedding" => Flavor::Gemma3,
            _ => Flavor::Llama,
        }
    }
}

/// One attention layer: its cache's cells per stream and whether it slides.
#[derive(Debug, Clone, Copy)]
pub struct Layer {
    pub n_kv: u64,
    pub swa: bool,
    pub n_head_kv: u64,
}

/// Everything the graph's sizes depend on.
#[derive(Debug, Clone)]
pub struct Shape {
    pub flavor: Flavor,
    pub n_ubatch: u64,
    pub n_embd: u64,
    pub n_head: u64,
    pub head_dim_k: u64,
    pub head_dim_v: u64,
    pub n_ff: u64,
    pub n_vocab: u64,
    pub layers: Vec<Layer>,
    pub flash_attn: bool,
    /// Quantized K / V cache with head sizes a multiple of 64: llama.cpp rotates q and k (v and
    /// the attention output) by a Hadamard matrix (`attn_rot_k`, `attn_rot_v`).
    pub k_rot: bool,
    pub v_rot: bool,
    /// What the cache types mean for flash attention (unused without it).
    pub k_cache: CacheType,
    pub v_cache: CacheType,
    /// MLA: V is a view of K's cache (one f16 copy serves both).
    pub v_is_k_view: bool,
}

/// A K or V cache's element type, as flash attention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheType {
    /// Read as stored.
    F16,
    /// `build_attn_mha` casts an f32 cache view to f16: a graph node, on every backend.
    F32,
    /// Quantized or BF16: the CPU kernel reads it as stored; ggml-cuda's multi-token kernels
    /// (MMA, tile) read f16 and convert the view into space behind the attention output, which
    /// the CUDA buffer type counts in that node's size
    /// (`ggml_cuda_flash_attn_ext_get_alloc_size`).
    Converted,
}

/// Which part of the model one device's buffer runs.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// Layers `first..end` (empty: none).
    pub first: usize,
    pub end: usize,
    pub output: bool,
    /// A GPU's buffer: the token embeddings' input stays on the host (the scheduler copies
    /// only what a GPU split reads: the embeddings' `get_rows`, modelled by that node).
    pub gpu: bool,
}

/// One cache's inputs: `[weights, cache, positions, k_idxs, v_idxs, mask]` and its rotations.
struct Kv {
    swa: bool,
    ids: [Id; 6],
    rot: (Option<Id>, Option<Id>),
}

/// Builds the graph of `part` (inputs, its layers, the output when it holds it).
pub fn build(s: &Shape, part: Part) -> Graph {
    let mut g = Graph::default();
    let n = s.n_ubatch;
    let f32_ = |x: u64| x.saturating_mul(4).saturating_mul(n);
    let e = f32_(s.n_embd);
    let w = g.external();
    let cache = g.external();
    let gemma = s.flavor != Flavor::Llama;

    let tokens = g.input(4 * n);
    if !part.gpu {
        g.input(e); // inp_embd: the embeddings path, consumed by no node of a token batch
    }
    // llama_kv_cache::build_input_k_rot: the largest power of two (64 or more) dividing the
    // head size; V's is always 64 x 64. Each cache (full, sliding) has its own pair; the first
    // cache's comes before the positions.
    let k_rot_bytes = 4u64 << (2 * s.head_dim_k.trailing_zeros().clamp(6, 30));
    let rot = |g: &mut Graph| {
        let k = s.k_rot.then(|| g.input(k_rot_bytes));
        let v = s.v_rot.then(|| g.input(4 * 64 * 64));
        (k, v)
    };
    let k_rot0 = s.k_rot.then(|| g.input(k_rot_bytes));
    let pos = g.input(4 * n);
    let v_rot0 = s.v_rot.then(|| g.input(4 * 64 * 64));
    let mut first_rot = Some((k_rot0, v_rot0));
    // One input set per cache kind, in the order the layers first use them.
    let layers = &s.layers[part.first..part.end];
    let mut kinds: Vec<Kv> = Vec::new();
    for l in layers {
        if l.n_head_kv == 0 || kinds.iter().any(|k| k.swa == l.swa) {
            continue;
        }
        let rot = first_rot.take().unwrap_or_else(|| rot(&mut g));
        let k_idxs = g.input(8 * n);
        let v_rows = if s.flash_attn {
            1
        } else {
            l.n_head_kv.saturating_mul(s.head_dim_v)
        };
        let v_idxs = g.input((8 * n).saturating_mul(v_rows));
        let mask_elt = if s.flash_attn { 2 } else { 4 };
        let mask = g.input(l.n_kv.saturating_mul(n).saturating_mul(mask_elt));
        kinds.push(Kv {
            swa: l.swa,
            ids: [w, cache, pos, k_idxs, v_idxs, mask],
            rot,
        });
    }
    let out_ids = g.input(4 * n);

    let mut cur = g.op(e, &[w, tokens]);
    if gemma {
        cur = g.inplace(&[cur]);
    }
    for (i, l) in layers.iter().enumerate() {
        let last = part.first + i + 1 == s.layers.len();
        let Some(kv) = kinds.iter().find(|k| k.swa == l.swa) else {
            continue;
        };
        cur = layer(&mut g, s, l, cur, kv, last.then_some(out_ids), part.gpu);
    }
    if part.output {
        let mut x = g.inplace(&[cur]);
        x = g.inplace(&[x, w]);
        let mut logits = g.op(f32_(s.n_vocab), &[w, x]);
        if s.flavor == Flavor::Gemma2 {
            for _ in 0..3 {
                logits = g.inplace(&[logits]);
            }
        }
        // The logits are the graph's output: nothing consumes them, so nothing frees them.
    }
    g
}

/// The flash-attention node's size: its output, and on a GPU the f16 copies of a converted K
/// and V behind it, each 128-aligned (`ggml_cuda_flash_attn_ext_get_f16_extra_data`; ggml-alloc
/// asks before the node has an address, so the padding is of the running size). The reserve's
/// batch of `n_ubatch` tokens takes the MMA or tile kernel, which read f16; at 1-2 tokens the
/// vector kernel reads quantized K/V as stored (a K/V type pair without a vector kernel, which
/// needs the copies there too, is not modelled).
fn fa_bytes(s: &Shape, gpu: bool, out: u64, nel_k: u64, nel_v: u64) -> u64 {
    if !gpu || s.n_ubatch <= 2 {
        return out;
    }
    let pad = |x: u64| {
        x.div_ceil(super::CUDA_ALIGN)
            .saturating_mul(super::CUDA_ALIGN)
    };
    let mut end = out;
    if s.k_cache == CacheType::Converted {
        end = pad(end).saturating_add(nel_k.saturating_mul(2));
    }
    if s.v_cache == CacheType::Converted && !s.v_is_k_view {
        end = pad(end).saturating_add(nel_v.saturating_mul(2));
    }
    end
}

fn norm(g: &mut Graph, x: Id, w: Id, bytes: u64) -> Id {
    let n = g.op(bytes, &[x]); // rms_norm of a tensor with other consumers: a new tensor
    g.inplace(&[n, w])
}

fn layer(
    g: &mut Graph,
    s: &Shape,
    l: &Layer,
    inp: Id,
    kv: &Kv,
    out_ids: Option<Id>,
    gpu: bool,
) -> Id {
    let [w, cache, pos, k_idxs, v_idxs, mask] = kv.ids;
    let (k_rot, v_rot) = kv.rot;
    let n = s.n_ubatch;
    let f32_ = |x: u64| x.saturating_mul(4).saturating_mul(n);
    let e = f32_(s.n_embd);
    let eq = f32_(s.n_head.saturating_mul(s.head_dim_k));
    let ek = f32_(l.n_head_kv.saturating_mul(s.head_dim_k));
    let ev = f32_(l.n_head_kv.saturating_mul(s.head_dim_v));
    let eo = f32_(s.n_head.saturating_mul(s.head_dim_v));
    let gemma = s.flavor != Flavor::Llama;

    let x = norm(g, inp, w, e);
    // q: mul_mat, reshape (a view), [q norm], rope, [scale], [hadamard].
    let proj = |g: &mut Graph, bytes: u64, qk: bool| {
        let m = g.op(bytes, &[w, x]);
        let v = g.view(m, &[]);
        if !qk {
            return v;
        }
        // Rope of the reshape view makes a new tensor; Gemma-3's q/k norm comes first, and
        // rope then runs in place on it.
        if s.flavor == Flavor::Gemma3 {
            let nrm = g.op(bytes, &[v]);
            let nrm = g.inplace(&[nrm, w]);
            g.inplace(&[nrm, pos])
        } else {
            g.op(bytes, &[v, pos])
        }
    };
    // Each chain (projection, rope, Hadamard rotation) is expanded whole: q, then v and k
    // (k last for llama, for rope fusion into the cache; Gemma's builders reach k first).
    let mut q = proj(g, eq, true);
    if gemma {
        q = g.inplace(&[q]);
    }
    if let Some(r) = k_rot {
        q = g.op(eq, &[r, q]);
    }
    let v_chain = |g: &mut Graph| {
        let v = proj(g, ev, false);
        match v_rot {
            Some(r) => g.op(ev, &[r, v]),
            None => v,
        }
    };
    let k_chain = |g: &mut Graph| {
        let k = proj(g, ek, true);
        match k_rot {
            Some(r) => g.op(ek, &[r, k]),
            None => k,
        }
    };
    let (k, v) = if gemma {
        let k = k_chain(g);
        (k, v_chain(g))
    } else {
        let v = v_chain(g);
        (k_chain(g), v)
    };
    g.view(cache, &[k, k_idxs]); // set_rows into the cache
    g.view(cache, &[v, v_idxs]);
    let qv = g.view(q, &[]);
    let mut cur = if s.flash_attn {
        let nel_k = l
            .n_kv
            .saturating_mul(l.n_head_kv)
            .saturating_mul(s.head_dim_k);
        let nel_v = l
            .n_kv
            .saturating_mul(l.n_head_kv)
            .saturating_mul(s.head_dim_v);
        // The casts are srcs 1 and 2 of the attention node, expanded in that order.
        let k = match s.k_cache {
            CacheType::F32 => g.op(nel_k.saturating_mul(2), &[cache]),
            _ => cache,
        };
        let v = match s.v_cache {
            CacheType::F32 => g.op(nel_v.saturating_mul(2), &[cache]),
            _ => cache,
        };
        let o = g.op(fa_bytes(s, gpu, eo, nel_k, nel_v), &[qv, k, v, mask]);
        g.view(o, &[])
    } else {
        let mut kq = g.op(
            l.n_kv.saturating_mul(s.n_head).saturating_mul(4 * n),
            &[cache, qv],
        );
        if s.flavor == Flavor::Gemma2 {
            for _ in 0..3 {
                kq = g.inplace(&[kq]);
            }
        }
        let kq = g.inplace(&[kq, mask]);
        let kqv = g.op(eo, &[cache, kq]);
        let p = g.view(kqv, &[]);
        g.op(eo, &[p])
    };
    if let Some(r) = v_rot {
        cur = g.op(eo, &[r, cur]);
    }
    cur = g.op(e, &[w, cur]);
    let mut res = inp;
    if let Some(ids) = out_ids {
        cur = g.op(e, &[cur, ids]);
        res = g.op(e, &[res, ids]);
    }
    if gemma {
        cur = g.inplace(&[cur]);
        cur = g.inplace(&[cur, w]);
    }
    let ffn_inp = g.inplace(&[cur, res]);
    let x = norm(g, ffn_inp, w, e);
    let ff = f32_(s.n_ff);
    let gate = g.op(ff, &[w, x]);
    let up = g.op(ff, &[w, x]);
    let glu = g.op(ff, &[gate, up]);
    let mut down = g.op(e, &[w, glu]);
    if gemma {
        down = g.inplace(&[down]);
        down = g.inplace(&[down, w]);
    }
    g.inplace(&[down, ffn_inp])
}
