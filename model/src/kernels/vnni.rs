//! `x @ w^T` for an int8 weight with the input quantized to int8 as well, on AVX-512 VNNI.
//!
//! Weight-only int8 (`small_rows`) reads a quarter of f32's bytes but still multiplies in f32,
//! so at 16 decode rows and for prefill it is bound by arithmetic, not memory. VNNI's
//! `vpdpbusd` does 64 byte products per instruction against 16 f32 multiply-adds. Each input
//! row is quantized on the fly with its own scale (absmax / 127), as PyTorch's dynamic int8
//! quantization does; sums are exact in i32, so a row's result does not depend on which other
//! rows share its product (a decode step equals the prefill of the same row).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes: the input goes in as `q + 128`, and the
//! weight row's `128 * sum(w)` (precomputed, [`compensation`]) is taken off every sum.

use crate::error::{ModelError, Result};
use rayon::prelude::*;

/// Input rows and output columns per rayon task. A task's weight block (64 rows of k bytes)
/// and input rows stay in cache while every register tile of the task reads them.
const TASK_ROWS: usize = 64;
const TASK_COLS: usize = 64;
/// Register tile: 4 input rows by 4 weight rows, sixteen i32 accumulators.
const TILE: usize = 4;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `128 * sum(row)` for each row of an int8 weight (out, k).
pub(crate) fn compensation(values: &[i8], k: usize) -> Vec<i32> {
    if k == 0 {
        return Vec::new();
    }
    values
        .chunks_exact(k)
        .map(|row| 128 * row.iter().map(|&v| i32::from(v)).sum::<i32>())
        .collect()
}

/// An int8 weight (out, k), row-major, with one scale per output row.
pub(crate) struct Int8Weight<'a> {
    pub values: &'a [i8],
    pub scales: &'a [f32],
    pub compensation: &'a [i32],
}

/// Input rows quantized to `q + 128` bytes, with one scale per row.
struct QuantizedRows {
    values: Vec<u8>,
    scales: Vec<f32>,
}

fn quantize_rows(xs: &[f32], k: usize) -> QuantizedRows {
    let rows = xs.len() / k;
    let mut values = vec![0u8; rows * k];
    let mut scales = vec![0f32; rows];
    values
        .par_chunks_mut(k)
        .zip(xs.par_chunks(k))
        .zip(scales.par_iter_mut())
        .for_each(|((q, x), scale)| {
            let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            // An all-zero row keeps scale 1: its values are zero either way.
            *scale = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
            let inv = 1.0 / *scale;
            q.iter_mut().zip(x).for_each(|(q, v)| *q = shifted_level(v * inv));
        });
    QuantizedRows { values, scales }
}

/// `round(v) + 128` for `v` within [-127, 127] (clamped first), rounding halves to even. The
/// 1.5 * 2^23 trick rounds with two additions that vectorize; `f32::round` is a libm call per
/// element on baseline x86-64 (6% of a prefill).
#[inline]
fn shifted_level(v: f32) -> u8 {
    const MAGIC: f32 = 12_582_912.0;
    ((v.clamp(-127.0, 127.0) + MAGIC) - MAGIC + 128.0) as u8
}

/// `y = x @ w^T`, `x` (rows, k) f32 and `w` (out, k) int8; `y` is (rows, out). An error where
/// [`available`] is false, or where a slice is shorter than its shape.
pub(crate) fn matmul_t(xs: &[f32], rows: usize, w: &Int8Weight, out: usize, k: usize) -> Result<Vec<f32>> {
    if !available() {
        return Err(ModelError::Kernel("int8 product: this CPU lacks AVX-512 VNNI".into()));
    }
    if xs.len() < rows * k || w.values.len() < out * k || w.scales.len() < out || w.compensation.len() < out {
        return Err(ModelError::ShapeMismatch(format!(
            "int8 product: input of {} values for {rows} x {k}, weight of {} for {out} x {k}, {} scales, {} sums",
            xs.len(),
            w.values.len(),
            w.scales.len(),
            w.compensation.len()
        )));
    }
    let mut y = vec![0f32; rows * out];
    if rows == 0 || out == 0 || k == 0 {
        return Ok(y);
    }
    let x = quantize_rows(xs, k);
    let y_ptr = OutPtr(y.as_mut_ptr());
    let row_tasks = rows.div_ceil(TASK_ROWS);
    let col_tasks = out.div_ceil(TASK_COLS);
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        let (r0, c0) = (task / col_tasks * TASK_ROWS, task % col_tasks * TASK_COLS);
        let block = Block {
            x: &x,
            w,
            k,
            out,
            r0,
            r1: (r0 + TASK_ROWS).min(rows),
            c0,
            c1: (c0 + TASK_COLS).min(out),
        };
        // SAFETY: `available` checked the CPU; the tasks' blocks of y are disjoint and y
        // outlives the parallel loop.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::block(&block, &y_ptr)
        };
    });
    Ok(y)
}

/// The output buffer, written by tasks at disjoint (row, column) blocks.
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own block (see `matmul_t`).
unsafe impl Sync for OutPtr {}

/// One task: input rows r0..r1 by weight rows (output columns) c0..c1.
struct Block<'a> {
    x: &'a QuantizedRows,
    w: &'a Int8Weight<'a>,
    k: usize,
    out: usize,
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Block, OutPtr, TILE};
    use std::arch::x86_64::*;

    /// Register tiles of up to TILE x TILE over the block.
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `y` must hold the (rows, out) result, of
    /// which this call writes only its block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn block(b: &Block, y: &OutPtr) {
        let mut r = b.r0;
        while r < b.r1 {
            let nr = (b.r1 - r).min(TILE);
            let mut c = b.c0;
            while c < b.c1 {
                let nc = (b.c1 - c).min(TILE);
                // SAFETY: forwarded contract; the tile lies within the block.
                unsafe {
                    match (nr, nc) {
                        (4, 4) => tile::<4, 4>(b, y, r, c),
                        (4, 3) => tile::<4, 3>(b, y, r, c),
                        (4, 2) => tile::<4, 2>(b, y, r, c),
                        (4, _) => tile::<4, 1>(b, y, r, c),
                        (3, 4) => tile::<3, 4>(b, y, r, c),
                        (3, 3) => tile::<3, 3>(b, y, r, c),
                        (3, 2) => tile::<3, 2>(b, y, r, c),
                        (3, _) => tile::<3, 1>(b, y, r, c),
                        (2, 4) => tile::<2, 4>(b, y, r, c),
                        (2, 3) => tile::<2, 3>(b, y, r, c),
                        (2, 2) => tile::<2, 2>(b, y, r, c),
                        (2, _) => tile::<2, 1>(b, y, r, c),
                        (_, 4) => tile::<1, 4>(b, y, r, c),
                        (_, 3) => tile::<1, 3>(b, y, r, c),
                        (_, 2) => tile::<1, 2>(b, y, r, c),
                        (_, _) => tile::<1, 1>(b, y, r, c),
                    }
                }
                c += nc;
            }
            r += nr;
        }
    }

    /// R input rows from r0 by C weight rows from c0: the sums, corrected and scaled, into y.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline(never)]
    unsafe fn tile<const R: usize, const C: usize>(b: &Block, y: &OutPtr, r0: usize, c0: usize) {
        let k = b.k;
        // SAFETY: rows r0..r0+R and c0..c0+C exist (the block is within the shapes).
        let acc = unsafe { accumulate::<R, C>(b.x.values.as_ptr().add(r0 * k), b.w.values.as_ptr().add(c0 * k), k) };
        if R == 4 && C == 4 {
            // Full tiles reduce all sixteen sums with one shuffle tree: reducing each on its
            // own cost as much as the products at k = 512.
            let v: [__m512i; 16] = std::array::from_fn(|i| acc[i / 4][i % 4]);
            let sums = reduce16(&v);
            let comp: [i32; 16] = std::array::from_fn(|i| b.w.compensation[c0 + i % 4]);
            let scale: [f32; 16] = std::array::from_fn(|i| b.x.scales[r0 + i / 4] * b.w.scales[c0 + i % 4]);
            // SAFETY: 16 values each.
            let values = unsafe {
                let exact = _mm512_sub_epi32(sums, _mm512_loadu_si512(comp.as_ptr().cast()));
                _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_loadu_ps(scale.as_ptr()))
            };
            let mut out = [0f32; 16];
            // SAFETY: 16 values.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), values) };
            for r in 0..4 {
                // SAFETY: row r0 + r, columns c0..c0+4 are in this task's block.
                unsafe { std::ptr::copy_nonoverlapping(out[4 * r..].as_ptr(), y.0.add((r0 + r) * b.out + c0), 4) };
            }
            return;
        }
        for (r, acc) in acc.iter().enumerate() {
            let x_scale = b.x.scales[r0 + r];
            for (c, a) in acc.iter().enumerate() {
                let col = c0 + c;
                let sum = _mm512_reduce_add_epi32(*a) - b.w.compensation[col];
                // SAFETY: (r0 + r, col) is in this task's block, which no other task writes.
                unsafe { *y.0.add((r0 + r) * b.out + col) = sum as f32 * x_scale * b.w.scales[col] };
            }
        }
    }

    /// Lane i of the result is the sum of the sixteen i32 lanes of `v[i]` (the shuffle tree
    /// of `decode`'s f32 attention scores, on integers).
    #[target_feature(enable = "avx512f")]
    pub(super) fn reduce16(v: &[__m512i; 16]) -> __m512i {
        let pair = |a: __m512i, b: __m512i| _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let quad = |x: __m512i, y: __m512i| _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
        let y: [__m512i; 4] =
            std::array::from_fn(|m| quad(pair(v[4 * m], v[4 * m + 1]), pair(v[4 * m + 2], v[4 * m + 3])));
        let halves = |a: __m512i, b: __m512i| {
            _mm512_add_epi32(_mm512_shuffle_i32x4::<0x88>(a, b), _mm512_shuffle_i32x4::<0xDD>(a, b))
        };
        let (u01, u23) = (halves(y[0], y[1]), halves(y[2], y[3]));
        halves(u01, u23)
    }

    /// Per-lane i32 sums of x[r] * w[c] over k bytes, 64 at a time, the last ones masked.
    /// A function of its own returning the accumulators by value, so they stay in registers.
    /// # Safety
    /// x must hold R rows and w C rows of k bytes; the CPU must have AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline(never)]
    unsafe fn accumulate<const R: usize, const C: usize>(x: *const u8, w: *const i8, k: usize) -> [[__m512i; C]; R] {
        let mut acc = [[_mm512_setzero_si512(); C]; R];
        let mut wv = [_mm512_setzero_si512(); C];
        let mut i = 0;
        while i < k {
            // Masked-off lanes load as 0 in both operands and add nothing.
            let mask: __mmask64 = if k - i >= 64 { !0 } else { (1u64 << (k - i)) - 1 };
            for (c, wv) in wv.iter_mut().enumerate() {
                // SAFETY: the mask keeps the load within row c.
                *wv = unsafe { _mm512_maskz_loadu_epi8(mask, w.add(c * k + i).cast()) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above, within row r.
                let xv = unsafe { _mm512_maskz_loadu_epi8(mask, x.add(r * k + i).cast()) };
                for (a, wv) in acc.iter_mut().zip(&wv) {
                    *a = _mm512_dpbusd_epi32(*a, xv, *wv);
                }
            }
            i += 64;
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Levels are the nearest integers (halves to even), clamped to ±127, plus 128.
    #[test]
    fn levels_round_to_nearest_and_clamp() {
        for (v, want) in [
            (0.0, 128),
            (0.4, 128),
            (0.6, 129),
            (-0.6, 127),
            (2.5, 130),
            (3.5, 132),
            (-126.7, 1),
            (300.0, 255),
            (-1e9, 1),
        ] {
            assert_eq!(shifted_level(v), want, "{v}");
        }
    }

    /// The integer shuffle tree gives lane i the sum of vector i's lanes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reduce16_sums_each_vector_into_its_lane() {
        use std::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let values: Vec<[i32; 16]> = (0..16)
            .map(|i| std::array::from_fn(|l| (i * 16 + l) as i32 * if l % 3 == 0 { -5 } else { 7 }))
            .collect();
        // SAFETY: the CPU has AVX-512F (checked above).
        let got = unsafe {
            let v: [__m512i; 16] = std::array::from_fn(|i| _mm512_loadu_si512(values[i].as_ptr().cast()));
            let mut out = [0i32; 16];
            _mm512_storeu_si512(out.as_mut_ptr().cast(), avx512::reduce16(&v));
            out
        };
        for (i, v) in values.iter().enumerate() {
            assert_eq!(got[i], v.iter().sum::<i32>(), "lane {i}");
        }
    }

    /// A slice shorter than its shape, or a CPU without VNNI, is an error rather than a
    /// read past the end or a result of zeros.
    #[test]
    fn short_slices_are_an_error() {
        let values = [1i8; 8];
        let comp = compensation(&values, 4);
        let w = Int8Weight {
            values: &values,
            scales: &[1.0, 1.0],
            compensation: &comp,
        };
        let e = matmul_t(&[0.5; 7], 2, &w, 2, 4).expect_err("7 values for 2 x 4");
        assert!(e.to_string().contains("int8 product"), "{e}");
        assert_eq!(matmul_t(&[0.5; 8], 2, &w, 2, 4).is_ok(), available());
    }

    /// The kernel equals the same arithmetic done one product at a time: rows quantized with
    /// their own scale, exact integer sums, then both scales. Shapes around the tile, the
    /// task and the 64-byte step, with a zero row.
    #[test]
    fn products_equal_the_quantized_arithmetic_done_by_hand() {
        if !available() {
            return; // the kernel cannot run on this CPU; the callers fall back
        }
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        for (rows, out, k) in [(1, 1, 1), (3, 5, 64), (5, 7, 100), (70, 67, 129), (16, 130, 512)] {
            let mut xs: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            xs[..k].fill(0.0);
            let values: Vec<i8> = (0..out * k).map(|_| (next() * 127.0) as i8).collect();
            let scales: Vec<f32> = (0..out).map(|_| next().abs() + 0.01).collect();
            let comp = compensation(&values, k);
            let w = Int8Weight {
                values: &values,
                scales: &scales,
                compensation: &comp,
            };
            let y = matmul_t(&xs, rows, &w, out, k).expect("int8 product");
            for r in 0..rows {
                let x = &xs[r * k..(r + 1) * k];
                let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let sx = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
                for c in 0..out {
                    let sum: i32 = x
                        .iter()
                        .zip(&values[c * k..(c + 1) * k])
                        .map(|(v, &q)| (i32::from(shifted_level(v * (1.0 / sx))) - 128) * i32::from(q))
                        .sum();
                    let want = sum as f32 * sx * scales[c];
                    let got = y[r * out + c];
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "({rows}, {out}, {k}) at ({r}, {c}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
