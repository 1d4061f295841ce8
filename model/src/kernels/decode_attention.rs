//! The attention of one decode step on the CPU: each row's new query against its own KV
//! cache, read in place.
//!
//! Per row and layer candle's path is about a dozen small ops, each allocating; at 16
//! sequences that is over a thousand tiny ops per step. These kernels take one row's query
//! heads that share a KV head and its cached positions as slices, and compute
//! softmax(q k^T * scale) v directly, with an AVX-512 version where the CPU has it.
//! [`crate::decode`] decides when this path applies and gathers the slices.

use crate::kernels::softmax::softmax_rows;
use candle_core::Layout;

/// The query heads of one row that share KV head `kv`, (group, d), against that head's
/// cached positions `start..len`.
pub(crate) struct GroupAttention<'a> {
    pub q: &'a [f32],
    pub k: &'a CacheView<'a>,
    pub v: &'a CacheView<'a>,
    pub kv: usize,
    pub start: usize,
    pub scale: f32,
}

/// [`attend_group`] compiled for AVX-512 when the CPU has it. The crate is built for baseline
/// x86-64, so the plain function's loops vectorise only to SSE2's four lanes.
pub(crate) fn group_attention_kernel() -> fn(&GroupAttention, &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: returned only after checking that the CPU has the features.
            return |a, o| unsafe { attend_group_avx512(a, o) };
        }
    }
    attend_group
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_group_avx512(a: &GroupAttention, o: &mut [f32]) {
    // SAFETY: this function runs only where the CPU has AVX-512F.
    let mut p = if a.k.d.is_multiple_of(16) {
        unsafe { avx512_scores::scores(a) }
    } else {
        scores(a)
    };
    softmax_rows(&mut p, a.k.len - a.start);
    mix_values(a, &p, o)
}

/// Softmax(q k^T * scale) v for each query head of the group, into `o` (group, d).
#[inline(always)]
fn attend_group(a: &GroupAttention, o: &mut [f32]) {
    let mut p = scores(a);
    softmax_rows(&mut p, a.k.len - a.start);
    mix_values(a, &p, o)
}

/// q k^T * scale, (group, positions). Each cached key is read once for all heads of the group.
#[inline(always)]
fn scores(a: &GroupAttention) -> Vec<f32> {
    let d = a.k.d;
    let n = a.k.len - a.start;
    let mut p = vec![0f32; (a.q.len() / d) * n];
    for (j, pos) in (a.start..a.k.len).enumerate() {
        let key = a.k.position(a.kv, pos);
        for (g, qh) in a.q.chunks_exact(d).enumerate() {
            p[g * n + j] = crate::kernels::small_rows::dot_with::<false>(qh, key) * a.scale;
        }
    }
    p
}

/// The weighted sum of the cached values by each head's probabilities `p`, into `o`.
#[inline(always)]
fn mix_values(a: &GroupAttention, p: &[f32], o: &mut [f32]) {
    let d = a.k.d;
    let n = a.k.len - a.start;
    for (j, pos) in (a.start..a.k.len).enumerate() {
        let value = a.v.position(a.kv, pos);
        for (g, oh) in o.chunks_exact_mut(d).enumerate() {
            let w = p[g * n + j];
            oh.iter_mut().zip(value).for_each(|(o, x)| *o += w * x);
        }
    }
}

/// Scores sixteen positions at a time. A dot product per position ends in a horizontal sum of
/// sixteen lanes, which cost more than the multiply-adds at head_dim 64 (a third of a
/// 16-sequence decode step was attention); here the sixteen positions' partial sums are
/// reduced together by a shuffle tree into one vector of sixteen scores.
#[cfg(target_arch = "x86_64")]
mod avx512_scores {
    use super::GroupAttention;
    use std::arch::x86_64::*;

    /// As [`super::scores`], for head_dim a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(a: &GroupAttention) -> Vec<f32> {
        let d = a.k.d;
        let n = a.k.len - a.start;
        let group = a.q.len() / d;
        let mut p = vec![0f32; group * n];
        let scale = _mm512_set1_ps(a.scale);
        // Up to four query heads per pass, so each key is loaded once for all of them.
        for g0 in (0..group).step_by(4) {
            let heads = (group - g0).min(4);
            for j0 in (0..n).step_by(16) {
                let m = (n - j0).min(16);
                let mut acc = [[_mm512_setzero_ps(); 16]; 4];
                for jj in 0..m {
                    let key = a.k.position(a.kv, a.start + j0 + jj);
                    for (c, kc) in key.chunks_exact(16).enumerate() {
                        // SAFETY: the chunk holds exactly 16 values.
                        let kv = unsafe { _mm512_loadu_ps(kc.as_ptr()) };
                        for (h, acc) in acc.iter_mut().take(heads).enumerate() {
                            let qc = &a.q[(g0 + h) * d + c * 16..(g0 + h) * d + c * 16 + 16];
                            // SAFETY: as above.
                            acc[jj] = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(qc.as_ptr()) }, kv, acc[jj]);
                        }
                    }
                }
                for (h, acc) in acc.iter().take(heads).enumerate() {
                    let mut out = [0f32; 16];
                    // SAFETY: `out` holds 16 values.
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(reduce16(acc), scale)) };
                    let row = (g0 + h) * n + j0;
                    p[row..row + m].copy_from_slice(&out[..m]);
                }
            }
        }
        p
    }

    /// Lane i of the result is the sum of the sixteen lanes of `v[i]`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn reduce16(v: &[__m512; 16]) -> __m512 {
        // Pairs: per 128-bit lane, (a0+a2, b0+b2, a1+a3, b1+b3).
        let pair = |a: __m512, b: __m512| _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        // Quads: per 128-bit lane L, the lane-L sums of four vectors, in order (64-bit
        // unpacks move the pairs' f32 sums two at a time).
        let quad = |x: __m512, y: __m512| {
            let (xd, yd) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(xd, yd)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(xd, yd)),
            )
        };
        let y: [__m512; 4] =
            std::array::from_fn(|m| quad(pair(v[4 * m], v[4 * m + 1]), pair(v[4 * m + 2], v[4 * m + 3])));
        // y[m] holds, in 128-bit lane L, the lane-L sums of vectors 4m..4m+4. Adding lanes
        // (0, 2) to (1, 3) twice leaves lane m of the result with y[m]'s four-lane totals.
        let halves = |a: __m512, b: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
        };
        let (u01, u23) = (halves(y[0], y[1]), halves(y[2], y[3]));
        halves(u01, u23)
    }
}

/// One layer's cached keys or values of one sequence, (1, kv_heads, len, d), read in place:
/// each position's head_dim values must be contiguous; heads and positions may be strided.
pub(crate) struct CacheView<'a> {
    data: &'a [f32],
    head_stride: usize,
    pos_stride: usize,
    /// Cached positions.
    pub len: usize,
    d: usize,
}

impl<'a> CacheView<'a> {
    pub(crate) fn new(data: &'a [f32], layout: &Layout, kv_heads: usize, d: usize) -> Option<Self> {
        let (&[1, h, len, dd], &[_, hs, ps, 1]) = (layout.dims(), layout.stride()) else {
            return None;
        };
        if h != kv_heads || dd != d || len == 0 || data.len() < (h - 1) * hs + (len - 1) * ps + d {
            return None;
        }
        Some(Self {
            data,
            head_stride: hs,
            pos_stride: ps,
            len,
            d,
        })
    }

    fn position(&self, head: usize, pos: usize) -> &[f32] {
        let at = head * self.head_stride + pos * self.pos_stride;
        &self.data[at..at + self.d]
    }
}

#[cfg(test)]
mod tests {
    use super::{attend_group, CacheView, GroupAttention};

    /// A cache of two KV heads, each `len` positions of `d` values.
    fn view(data: &[f32], len: usize, d: usize) -> CacheView<'_> {
        CacheView {
            data,
            head_stride: len * d,
            pos_stride: d,
            len,
            d,
        }
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// The AVX-512 attention (sixteen positions per reduction, up to four heads per pass)
    /// equals the portable one, for head dims with and without a multiple of 16, position
    /// counts that leave partial blocks, a window start, and groups of 1, 2 and 6 heads.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_attention_equals_the_portable_one() {
        if !std::arch::is_x86_feature_detected!("avx512f") || !std::arch::is_x86_feature_detected!("fma") {
            return;
        }
        for (d, len, start, group) in [(16, 1, 0, 2), (64, 37, 0, 2), (32, 40, 9, 6), (24, 19, 3, 1)] {
            let kv_heads = 2;
            let (k, v) = (values(kv_heads * len * d, 1), values(kv_heads * len * d, 2));
            let (kc, vc) = (view(&k, len, d), view(&v, len, d));
            let q = values(group * d, 3);
            let a = GroupAttention {
                q: &q,
                k: &kc,
                v: &vc,
                kv: 1,
                start,
                scale: 0.125,
            };
            let mut want = vec![0f32; group * d];
            attend_group(&a, &mut want);
            let mut got = vec![0f32; group * d];
            // SAFETY: the CPU has the features (checked above).
            unsafe { super::attend_group_avx512(&a, &mut got) };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-5,
                    "d {d}, len {len}, start {start}, group {group}, at {i}: {g} vs {w}"
                );
            }
        }
    }

    /// The shuffle tree gives lane i the sum of vector i's lanes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reduce16_sums_each_vector_into_its_lane() {
        use std::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let values: Vec<[f32; 16]> = (0..16)
            .map(|i| std::array::from_fn(|l| (i * 16 + l) as f32 * if l % 3 == 0 { -0.5 } else { 1.0 }))
            .collect();
        // SAFETY: the CPU has AVX-512F (checked above).
        let got = unsafe {
            let v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(values[i].as_ptr()));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), super::avx512_scores::reduce16(&v));
            out
        };
        for (i, v) in values.iter().enumerate() {
            assert_eq!(got[i], v.iter().sum::<f32>(), "lane {i}");
        }
    }
}
