//! Batched appends and gathers: a whole step (every sequence's new tokens, every layer's K and
//! V) in one backend call per pair of element types, each call one kernel launch on CUDA
//! (`kernels/paged_kv.cu`), the CPU reference on the simulated device.
//!
//! Every call builds job descriptors (`AppendJob`, `GatherJob`) and, for appends, the `int32`
//! slot mapping of each group on the host, checks all of it, copies it into a staging buffer
//! (`staging`), and only then queues anything: a refused call queues nothing.

use super::{live, PagedKvCache, State};
use crate::backend::{
    check_append_jobs, check_gather_jobs, AppendJob, DevicePtr, GatherJob, Stream,
};
use crate::error::{Error, Result};
use crate::kv::HbmType;

/// A run of tokens whose slots are all stored (non-negative): `n` tokens from token `token` of
/// the caller's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    pub token: usize,
    pub n: usize,
}

/// Splits `slots` at the tokens not stored (negative slots: dropped by a sliding window): the
/// kernels write every position they are given, so skipped tokens end a job.
pub(super) fn segments(slots: &[i32]) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for (i, &s) in slots.iter().enumerate() {
        if s < 0 {
            continue;
        }
        match out.last_mut() {
            Some(seg) if seg.token + seg.n == i => seg.n += 1,
            _ => out.push(Segment { token: i, n: 1 }),
        }
    }
    out
}

/// Jobs of one batched call, by the element types they convert between; each list is one
/// backend call.
#[derive(Default)]
struct Batches<J> {
    lists: Vec<((HbmType, HbmType), Vec<J>)>,
}

impl<J> Batches<J> {
    fn push(&mut self, types: (HbmType, HbmType), job: J) {
        match self.lists.iter_mut().find(|(t, _)| *t == types) {
            Some((_, v)) => v.push(job),
            None => self.lists.push((types, vec![job])),
        }
    }

    fn count(&self) -> usize {
        self.lists.iter().map(|(_, v)| v.len()).sum()
    }
}

fn job_bytes<J>(jobs: &[J]) -> &[u8] {
    // SAFETY: `AppendJob` and `GatherJob` are `repr(C)` structs of integers with no padding
    // (8-byte fields, then two 4-byte ones); the slice covers exactly their bytes.
    unsafe { std::slice::from_raw_parts(jobs.as_ptr().cast(), std::mem::size_of_val(jobs)) }
}

fn i32_bytes(v: &[i32]) -> impl Iterator<Item = u8> + '_ {
    v.iter().flat_map(|x| x.to_ne_bytes())
}

impl PagedKvCache {
    /// K and V of `layer` (index `i` of its group `grp`), each with the device pointer the
    /// caller gave for it (`k`, `v`; 0: none), its stored type, elements and bytes per row.
    fn tensors_with_sources<'a>(
        &self,
        grp: &'a super::Group,
        i: usize,
        layer: u32,
        k: DevicePtr,
        v: DevicePtr,
    ) -> [(
        DevicePtr,
        Option<&'a super::BlockStorage>,
        HbmType,
        u32,
        usize,
    ); 2] {
        let l = layer as usize;
        let d = &self.derived;
        [
            (
                k,
                Some(&grp.k[i]),
                self.params.type_k,
                d.elems_k[l],
                d.row_k[l],
            ),
            (
                v,
                grp.v[i].as_ref(),
                self.params.type_v,
                d.elems_v[l],
                d.row_v[l],
            ),
        ]
    }

    /// The slots of a step for group `g` as `int32`s (`slot_mapping`'s order), each checked to
    /// lie in a block held by exactly one sequence.
    fn step_slots(&self, st: &State, g: usize, seqs: &[u32], n_new: &[u32]) -> Result<Vec<i32>> {
        let bt = self.params.block_tokens;
        let mut slots = Vec::new();
        for (&seq, &n) in seqs.iter().zip(n_new) {
            let s = live(st, seq)?;
            if n > s.len {
                return Err(Error::InvalidValue("n_new beyond the sequence's length"));
            }
            for pos in s.len - n..s.len {
                let id = s.tables[g][(pos / bt) as usize];
                if id < 0 {
                    slots.push(-1);
                    continue;
                }
                if st.groups[g].pool.refcount(id as u32) != 1 {
                    return Err(Error::InvalidValue(
                        "slot outside the blocks a single sequence holds",
                    ));
                }
                let slot = id as i64 * bt as i64 + (pos % bt) as i64;
                slots.push(
                    i32::try_from(slot).map_err(|_| Error::InvalidValue("slot beyond int32"))?,
                );
            }
        }
        Ok(slots)
    }

    /// Queues on `stream` the append of one step's new tokens in every layer: the last
    /// `n_new[i]` tokens of each live sequence `seqs[i]` (after `add_tokens`). `k_src[l]` (and
    /// `v_src[l]`) hold layer `l`'s rows of those tokens, sequence after sequence as
    /// `slot_mapping` lists them, contiguous, `src_type` (F32 or F16), in device memory; 0 skips
    /// a tensor, and `v_src` may be empty (no V anywhere). Each row is converted to the cache's
    /// type exactly as `kv::quant::quantize_row`; tokens a window already dropped are skipped.
    ///
    /// One backend call (one kernel launch on CUDA) per pair of element types: one for the whole
    /// step when K and V have the same type. `InvalidValue` (nothing queued) for a source list
    /// of the wrong length, a V source on a layer without V, another `src_type`, a misaligned
    /// source, a sequence not live, `n_new` beyond its length, or a token in a shared block.
    pub fn append_step(
        &self,
        seqs: &[u32],
        n_new: &[u32],
        k_src: &[DevicePtr],
        v_src: &[DevicePtr],
        src_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        let n_layers = self.params.layers.len();
        if seqs.len() != n_new.len() {
            return Err(Error::InvalidValue("seqs and n_new differ in length"));
        }
        if k_src.len() != n_layers || (!v_src.is_empty() && v_src.len() != n_layers) {
            return Err(Error::InvalidValue("one source per layer"));
        }
        let mut st = self.lock();
        let slots = (0..st.groups.len())
            .map(|g| self.step_slots(&st, g, seqs, n_new))
            .collect::<Result<Vec<_>>>()?;
        let layers = (0..n_layers).map(|l| {
            let v = v_src.get(l).copied().unwrap_or(0);
            (l as u32, k_src[l], v)
        });
        self.append_jobs(&mut st, layers, &slots, src_type, stream)
    }

    /// Builds, checks, stages and queues the appends of `layers` ((layer, K source, V source))
    /// whose group `g` writes `slots[g]` (token `i` of a source to slot `slots[g][i]`).
    pub(super) fn append_jobs(
        &self,
        st: &mut State,
        layers: impl Iterator<Item = (u32, DevicePtr, DevicePtr)>,
        slots: &[Vec<i32>],
        src_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        let b = self.backend.as_ref();
        let segs: Vec<Vec<Segment>> = slots.iter().map(|s| segments(s)).collect();
        // Slot arrays first in the buffer (4-byte aligned), jobs after them at an 8-byte offset.
        let mut slot_off = Vec::with_capacity(slots.len());
        let mut bytes = 0usize;
        for s in slots {
            slot_off.push(bytes);
            bytes += s.len() * 4;
        }
        let jobs_off = bytes.next_multiple_of(16);
        // Positions are pointers into the staging buffer: take it before building the jobs.
        let mut batches: Batches<AppendJob> = Batches::default();
        let mut plan = Vec::new();
        for (layer, k, v) in layers {
            let (g, i) = self.layer_group(layer)?;
            let grp = &st.groups[g];
            if v != 0 && grp.v[i].is_none() {
                return Err(Error::InvalidValue("V rows for a layer without V"));
            }
            let tensors = self.tensors_with_sources(grp, i, layer, k, v);
            for (src, t, ty, elems, row) in tensors {
                let Some(t) = t.filter(|_| src != 0) else {
                    continue;
                };
                let src_row = src_type
                    .row_bytes(elems as usize)
                    .filter(|_| matches!(src_type, HbmType::F32 | HbmType::F16))
                    .ok_or(Error::InvalidValue("append reads F32 or F16 rows"))?;
                for seg in &segs[g] {
                    plan.push((
                        (src_type, ty),
                        AppendJob {
                            src: (src + seg.token * src_row) as u64,
                            dst: t.base() as u64,
                            positions: (slot_off[g] + seg.token * 4) as u64, // rebased below
                            dst_row_stride: row as u64,
                            row_elems: elems,
                            n_rows: seg.n as u32,
                        },
                    ));
                }
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        let total = jobs_off + plan.len() * std::mem::size_of::<AppendJob>();
        let taken = st.staging.take(b, total)?;
        for (types, mut job) in plan {
            job.positions += taken.ptr as u64;
            batches.push(types, job);
        }
        for ((s, d), jobs) in &batches.lists {
            check_append_jobs(jobs, *s, *d)?;
        }
        let mut host = Vec::with_capacity(total);
        for s in slots {
            host.extend(i32_bytes(s));
        }
        host.resize(jobs_off, 0);
        let mut starts = Vec::new();
        for (_, jobs) in &batches.lists {
            starts.push(host.len());
            host.extend_from_slice(job_bytes(jobs));
        }
        debug_assert_eq!(host.len(), total);
        debug_assert_eq!(
            batches.count() * std::mem::size_of::<AppendJob>() + jobs_off,
            total
        );
        let queued = b.copy_from_host_on(taken.ptr, &host, stream).and_then(|_| {
            for (((s, d), jobs), at) in batches.lists.iter().zip(&starts) {
                b.kv_append_jobs(jobs, taken.ptr + at, *s, *d, stream)?;
            }
            Ok(())
        });
        st.staging.in_flight(b, taken, stream, host);
        queued
    }

    /// Queues on `stream` the conversion of live `seq`'s tokens `start .. start + n_tokens` of
    /// every layer into `k_dst[l]` (and `v_dst[l]`) as `dst_type` (F32 or F16), contiguous, in
    /// device memory, exactly as `gather` does layer by layer; 0 skips a tensor and `v_dst` may
    /// be empty. One backend call (one launch on CUDA) per pair of element types.
    #[allow(clippy::too_many_arguments)]
    pub fn gather_layers(
        &self,
        seq: u32,
        start: u32,
        n_tokens: u32,
        k_dst: &[DevicePtr],
        v_dst: &[DevicePtr],
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        let n_layers = self.params.layers.len();
        if k_dst.len() != n_layers || (!v_dst.is_empty() && v_dst.len() != n_layers) {
            return Err(Error::InvalidValue("one destination per layer"));
        }
        let mut st = self.lock();
        let layers =
            (0..n_layers).map(|l| (l as u32, k_dst[l], v_dst.get(l).copied().unwrap_or(0)));
        self.gather_jobs(&mut st, seq, start, n_tokens, layers, dst_type, stream)
    }

    /// Builds, checks, stages and queues the gathers of `seq`'s tokens `start ..
    /// start + n_tokens` for `layers` ((layer, K destination, V destination)).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gather_jobs(
        &self,
        st: &mut State,
        seq: u32,
        start: u32,
        n_tokens: u32,
        layers: impl Iterator<Item = (u32, DevicePtr, DevicePtr)>,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        let b = self.backend.as_ref();
        let s = live(st, seq)?;
        let end = start
            .checked_add(n_tokens)
            .filter(|&e| e <= s.len)
            .ok_or(Error::InvalidValue("tokens past the sequence's end"))?;
        let bt = self.params.block_tokens;
        let layers: Vec<(u32, DevicePtr, DevicePtr)> = layers.collect();
        let mut used = vec![false; st.groups.len()];
        for &(layer, k, v) in &layers {
            let g = self.layer_group(layer)?.0;
            used[g] |= k != 0 || v != 0;
        }
        // The tokens' slots in each window group read, the gather's row lists: one job per
        // tensor then covers all of the sequence's blocks (a job per block left a gather bound
        // by building and uploading thousands of descriptors).
        let mut slots: Vec<Vec<i32>> = Vec::with_capacity(st.groups.len());
        for (table, &used) in s.tables.iter().zip(&used) {
            let mut rows = Vec::with_capacity(if used { n_tokens as usize } else { 0 });
            for pos in (start..end).filter(|_| used) {
                let id = table[(pos / bt) as usize];
                if id < 0 {
                    return Err(Error::InvalidValue(
                        "tokens the sliding window already gave back",
                    ));
                }
                let slot = id as i64 * bt as i64 + (pos % bt) as i64;
                rows.push(
                    i32::try_from(slot).map_err(|_| Error::InvalidValue("slot beyond int32"))?,
                );
            }
            slots.push(rows);
        }
        let mut slot_off = Vec::with_capacity(slots.len());
        let mut bytes = 0usize;
        for rows in &slots {
            slot_off.push(bytes);
            bytes += rows.len() * 4;
        }
        let jobs_off = bytes.next_multiple_of(16);
        let mut plan = Vec::new();
        for (layer, k, v) in layers {
            let (g, i) = self.layer_group(layer)?;
            let grp = &st.groups[g];
            if v != 0 && grp.v[i].is_none() {
                return Err(Error::InvalidValue("V rows for a layer without V"));
            }
            let tensors = self.tensors_with_sources(grp, i, layer, k, v);
            for (dst, t, ty, elems, row) in tensors {
                let Some(t) = t.filter(|_| dst != 0) else {
                    continue;
                };
                dst_type
                    .row_bytes(elems as usize)
                    .filter(|_| matches!(dst_type, HbmType::F32 | HbmType::F16))
                    .ok_or(Error::InvalidValue("gather writes F32 or F16 rows"))?;
                plan.push((
                    (ty, dst_type),
                    GatherJob {
                        src: t.base() as u64,
                        src_row_stride: row as u64,
                        dst: dst as u64,
                        rows: slot_off[g] as u64, // rebased below
                        row_elems: elems,
                        n_rows: n_tokens,
                    },
                ));
            }
        }
        if plan.is_empty() || n_tokens == 0 {
            return Ok(());
        }
        let total = jobs_off + plan.len() * std::mem::size_of::<GatherJob>();
        let taken = st.staging.take(b, total)?;
        let mut batches: Batches<GatherJob> = Batches::default();
        for (types, mut job) in plan {
            job.rows += taken.ptr as u64;
            batches.push(types, job);
        }
        for ((s, d), jobs) in &batches.lists {
            check_gather_jobs(jobs, *s, *d)?;
        }
        let mut host = Vec::with_capacity(total);
        for rows in &slots {
            host.extend(i32_bytes(rows));
        }
        host.resize(jobs_off, 0);
        let mut starts = Vec::new();
        for (_, jobs) in &batches.lists {
            starts.push(host.len());
            host.extend_from_slice(job_bytes(jobs));
        }
        debug_assert_eq!(host.len(), total);
        let queued = b.copy_from_host_on(taken.ptr, &host, stream).and_then(|_| {
            for (((s, d), jobs), at) in batches.lists.iter().zip(&starts) {
                b.kv_dequantize_jobs(jobs, taken.ptr + at, *s, *d, stream)?;
            }
            Ok(())
        });
        st.staging.in_flight(b, taken, stream, host);
        queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_at_dropped_tokens() {
        assert_eq!(
            segments(&[-1, -1, 4, 5, 9, -1, 7]),
            vec![Segment { token: 2, n: 3 }, Segment { token: 6, n: 1 }]
        );
        assert!(segments(&[-1]).is_empty());
        assert!(segments(&[]).is_empty());
    }

    #[test]
    fn job_layouts_match_the_kernels() {
        // kernels/paged_kv.cu: hbm_append_job and hbm_gather_job are 4 u64 + 2 u32.
        assert_eq!(std::mem::size_of::<AppendJob>(), 40);
        assert_eq!(std::mem::size_of::<GatherJob>(), 40);
        assert_eq!(std::mem::offset_of!(AppendJob, row_elems), 32);
        assert_eq!(std::mem::offset_of!(GatherJob, rows), 24);
        assert_eq!(std::mem::offset_of!(GatherJob, row_elems), 32);
    }
}
