//! `x @ w^T` for few rows of `x`, as decoding needs it: one row per sequence of the batch.
//!
//! gemm does badly here: a single row takes its matrix-vector path on one thread, and a few
//! rows spend their time packing. This kernel reads the weight where it lies, splits the output
//! columns across rayon's threads, and computes register tiles of up to [`TILE_ROWS`] input rows
//! by [`TILE_COLS`] weight rows: each weight vector loaded feeds every row of the tile, so 16
//! rows cost little more memory traffic than one. The weight is f32, or int8 with one scale
//! per output column (expanded to f32 in registers: a single stream is bound by reading the
//! weights, and int8 reads a quarter of the bytes). Without AVX-512 it falls back to one dot
//! product per output.

use candle_core::Tensor;
use rayon::prelude::*;

/// Output columns per rayon task: enough work to amortise a task, small enough to balance.
const COLUMNS_PER_TASK: usize = 64;
/// Input rows per register tile.
const TILE_ROWS: usize = 4;
/// Weight rows (output columns) per register tile. 4 x 4 accumulators plus the loaded vectors
/// fit AVX-512's 32 registers.
const TILE_COLS: usize = 4;

/// A weight element the kernels read: f32, or int8 scaled per column.
pub(crate) trait Element: Copy + Default + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// Sixteen elements from `p` as f32 lanes.
    /// # Safety
    /// `p..p + 16` must be readable and the CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Element for i8 {
    fn to_f32(self) -> f32 {
        self as f32
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; 16 bytes are one unaligned 128-bit load.
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))) }
    }
}

/// A weight (out, k), row-major, with an optional scale per output column.
pub(crate) struct Weight<'a, E> {
    pub values: &'a [E],
    pub scales: Option<&'a [f32]>,
}

/// [`matmul_t`] on tensors: `x` (rows, k), f32 on the CPU, times the weight `w` of `out` rows
/// of `k_w` values; a feature count that differs from the weight's is an error.
pub(crate) fn product<E: Element>(x: &Tensor, w: &Weight<E>, out: usize, k_w: usize) -> crate::error::Result<Tensor> {
    let (rows, k) = x.dims2()?;
    if k != k_w {
        return Err(crate::error::ModelError::ShapeMismatch(format!(
            "matmul: input has {k} features, the weight {k_w}"
        )));
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(Tensor::from_vec(
        matmul_t(&xs, rows, w, out, k),
        (rows, out),
        x.device(),
    )?)
}

/// `y = x @ w^T` with `x` (rows, k) and `w` (out, k), both row-major; `y` is (rows, out).
/// The caller checks that the slices hold exactly those shapes.
pub(crate) fn matmul_t<E: Element>(xs: &[f32], rows: usize, w: &Weight<E>, out: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!(xs.len(), rows * k);
    debug_assert_eq!(w.values.len(), out * k);
    // Each task fills the transposed output of its columns, (cols, rows), which is contiguous.
    let mut yt = vec![0f32; out * rows];
    if rows == 0 || k == 0 {
        return yt;
    }
    let block = block_kernel::<E>();
    let ops = Operands { xs, rows, k };
    yt.par_chunks_mut(COLUMNS_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, yt)| {
            let c0 = task * COLUMNS_PER_TASK;
            let cols = yt.len() / rows;
            let scales = w.scales.map(|s| &s[c0..c0 + cols]);
            block(
                &ops,
                &Weight {
                    values: &w.values[c0 * k..(c0 + cols) * k],
                    scales,
                },
                yt,
            )
        });
    transpose(&yt, out, rows, false)
}

/// `src`, (rows, cols) row-major, transposed into a new (cols, rows) buffer in cache-sized
/// tiles, across rayon's threads when `parallel`. A decode step's products (a few rows, even
/// at 8192 columns for the head) transpose on this thread: waking the pool for them looked
/// 3 to 8% slower per 16-row step in alternating runs. A prefill's (1408, 128) products go
/// parallel.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, parallel: bool) -> Vec<f32> {
    const TILE: usize = 32;
    let mut dst = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return dst;
    }
    // Each task writes TILE rows of the result, i.e. TILE columns of the source.
    let tile = |(block, out): (usize, &mut [f32])| {
        let c0 = block * TILE;
        let nc = out.len() / rows;
        for r0 in (0..rows).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let line = &src[r * cols + c0..r * cols + c0 + nc];
                for (c, v) in line.iter().enumerate() {
                    out[c * rows + r] = *v;
                }
            }
        }
    };
    if parallel {
        dst.par_chunks_mut(TILE * rows).enumerate().for_each(tile);
    } else {
        dst.chunks_mut(TILE * rows).enumerate().for_each(tile);
    }
    dst
}

/// The input rows a block is multiplied with.
struct Operands<'a> {
    xs: &'a [f32],
    rows: usize,
    k: usize,
}

/// Fills `yt` (cols, rows) with the products of every input row and each row of the block.
type BlockKernel<E> = fn(&Operands, &Weight<E>, &mut [f32]);

fn block_kernel<E: Element>() -> BlockKernel<E> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: returned only after checking that the CPU has AVX-512F.
            return |ops, w, yt| unsafe { avx512::block(ops, w, yt) };
        }
    }
    block_by_dots::<E>
}

fn block_by_dots<E: Element>(ops: &Operands, w: &Weight<E>, yt: &mut [f32]) {
    let k = ops.k;
    let dot = dot_kernel();
    let mut wrow_f32 = vec![0f32; k];
    for (c, (wrow, col)) in w.values.chunks_exact(k).zip(yt.chunks_exact_mut(ops.rows)).enumerate() {
        wrow.iter().zip(&mut wrow_f32).for_each(|(e, f)| *f = e.to_f32());
        let scale = w.scales.map_or(1.0, |s| s[c]);
        for (r, y) in col.iter_mut().enumerate() {
            *y = dot(&ops.xs[r * k..(r + 1) * k], &wrow_f32) * scale;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Element, Operands, Weight, TILE_COLS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// See [`super::BlockKernel`]. Tiles of TILE_ROWS x TILE_COLS, then the remainders with
    /// narrower tiles, so every shape takes the vector path.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block<E: Element>(ops: &Operands, w: &Weight<E>, yt: &mut [f32]) {
        let (rows, k) = (ops.rows, ops.k);
        let cols = w.values.len() / k;
        let mut c0 = 0;
        while c0 < cols {
            let nc = (cols - c0).min(TILE_COLS);
            let mut r0 = 0;
            while r0 < rows {
                let nr = (rows - r0).min(TILE_ROWS);
                let tile = Tile { ops, w, r0, c0 };
                match (nr, nc) {
                    (4, 4) => tile.run::<4, 4>(yt),
                    (4, 3) => tile.run::<4, 3>(yt),
                    (4, 2) => tile.run::<4, 2>(yt),
                    (4, _) => tile.run::<4, 1>(yt),
                    (3, 4) => tile.run::<3, 4>(yt),
                    (3, 3) => tile.run::<3, 3>(yt),
                    (3, 2) => tile.run::<3, 2>(yt),
                    (3, _) => tile.run::<3, 1>(yt),
                    (2, 4) => tile.run::<2, 4>(yt),
                    (2, 3) => tile.run::<2, 3>(yt),
                    (2, 2) => tile.run::<2, 2>(yt),
                    (2, _) => tile.run::<2, 1>(yt),
                    (_, 4) => tile.run::<1, 4>(yt),
                    (_, 3) => tile.run::<1, 3>(yt),
                    (_, 2) => tile.run::<1, 2>(yt),
                    (_, _) => tile.run::<1, 1>(yt),
                }
                r0 += nr;
            }
            c0 += nc;
        }
    }

    /// Where one register tile starts: input row r0, column c0 of the block.
    struct Tile<'a, E> {
        ops: &'a Operands<'a>,
        w: &'a Weight<'a, E>,
        r0: usize,
        c0: usize,
    }

    impl<E: Element> Tile<'_, E> {
        /// R x C dot products of length k: the multiples of 16 in place, the tail of k from
        /// zero-padded copies. Writes yt[(c0 + c) * rows + r0 + r], scaled per column.
        #[target_feature(enable = "avx512f")]
        #[inline(never)]
        unsafe fn run<const R: usize, const C: usize>(&self, yt: &mut [f32]) {
            let (rows, k) = (self.ops.rows, self.ops.k);
            let x: &[f32] = &self.ops.xs[self.r0 * k..(self.r0 + R) * k];
            let w: &[E] = &self.w.values[self.c0 * k..(self.c0 + C) * k];
            let full = k / 16 * 16;
            // SAFETY: x holds R rows and w C rows of k >= full values.
            let mut acc = unsafe { accumulate::<E, R, C>(x.as_ptr(), w.as_ptr(), k, full) };
            if full < k {
                let mut xt = [[0f32; 16]; R];
                let mut wt = [[E::default(); 16]; C];
                for (r, xt) in xt.iter_mut().enumerate() {
                    xt[..k - full].copy_from_slice(&x[r * k + full..(r + 1) * k]);
                }
                for (c, wt) in wt.iter_mut().enumerate() {
                    wt[..k - full].copy_from_slice(&w[c * k + full..(c + 1) * k]);
                }
                // SAFETY: the copies hold R and C rows of 16 values.
                let tail = unsafe { accumulate::<E, R, C>(xt.as_ptr().cast(), wt.as_ptr().cast(), 16, 16) };
                for (acc, tail) in acc.iter_mut().flatten().zip(tail.iter().flatten()) {
                    *acc = _mm512_add_ps(*acc, *tail);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (c, a) in acc.iter().enumerate() {
                    let scale = self.w.scales.map_or(1.0, |s| s[self.c0 + c]);
                    yt[(self.c0 + c) * rows + self.r0 + r] = _mm512_reduce_add_ps(*a) * scale;
                }
            }
        }
    }

    /// Per-lane sums of x[r] * w[c] over the first `len` (a multiple of 16) of each row's
    /// `stride` values. A function of its own, returning the accumulators by value: with the
    /// reduction in the same function LLVM kept them on the stack, and every multiply-add
    /// went through memory.
    /// # Safety
    /// x must hold R rows and w C rows of `stride` >= `len` values; the CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn accumulate<E: Element, const R: usize, const C: usize>(
        x: *const f32,
        w: *const E,
        stride: usize,
        len: usize,
    ) -> [[__m512; C]; R] {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut wv = [_mm512_setzero_ps(); C];
        let mut i = 0;
        while i < len {
            for (c, wv) in wv.iter_mut().enumerate() {
                // SAFETY: i + 16 <= len <= stride, within row c.
                *wv = unsafe { E::load16(w.add(c * stride + i)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above, within row r.
                let xv = unsafe { _mm512_loadu_ps(x.add(r * stride + i)) };
                for (a, wv) in acc.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *wv, *a);
                }
            }
            i += 16;
        }
        acc
    }
}

/// The dot product to use on this CPU: compiled for AVX2 + FMA when the CPU has them (the
/// crate is built for baseline x86-64, which has only SSE2), else portable.
pub(crate) fn dot_kernel() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: returned only after checking that the CPU has the features.
            return |a, b| unsafe { dot_avx2(a, b) };
        }
    }
    dot_with::<false>
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_with::<true>(a, b)
}

/// Sixteen independent sums, which the compiler can vectorise (one running sum would fix the
/// order of the additions and keep it scalar). `FMA` only where the CPU has it: elsewhere
/// mul_add is a slow library call. Inlined, it vectorises for the caller's target features.
#[inline(always)]
pub(crate) fn dot_with<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = if FMA {
                x[i].mul_add(y[i], acc[i])
            } else {
                acc[i] + x[i] * y[i]
            };
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(xs: &[f32], rows: usize, ws: &[f32], out: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for c in 0..out {
                y[r * out + c] = (0..k).map(|i| xs[r * k + i] as f64 * ws[c * k + i] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn by_dots<E: Element>(xs: &[f32], rows: usize, w: &Weight<E>, out: usize, k: usize) -> Vec<f32> {
        let mut yt = vec![0f32; out * rows];
        block_by_dots(&Operands { xs, rows, k }, w, &mut yt);
        transpose(&yt, out, rows, false)
    }

    /// Both the serial and the parallel transpose put every value in its place, on shapes that
    /// leave partial tiles.
    #[test]
    fn transpose_moves_every_value() {
        for ((rows, cols), parallel) in [(1, 5), (33, 7), (300, 257)]
            .into_iter()
            .flat_map(|s| [(s, false), (s, true)])
        {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&src, rows, cols, parallel);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], src[r * cols + c], "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
    }

    const SHAPES: [(usize, usize, usize); 6] = [
        (1, 5, 16),
        (3, 67, 37),
        (4, 64, 512),
        (5, 130, 15),
        (16, 203, 100),
        (33, 9, 1),
    ];

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-3 * (1.0 + w.abs()), "{what} at {i}: {g} vs {w}");
        }
    }

    /// Both kernels equal a plain triple loop for row counts around the tile height, feature
    /// counts that are not multiples of 16 and column counts that leave partial tiles and
    /// tasks.
    #[test]
    fn f32_kernels_match_the_definition() {
        for (rows, out, k) in SHAPES {
            let (xs, ws) = (values(rows * k, 1), values(out * k, 7));
            let want = reference(&xs, rows, &ws, out, k);
            let w = Weight {
                values: ws.as_slice(),
                scales: None,
            };
            assert_close(&matmul_t(&xs, rows, &w, out, k), &want, &format!("{rows}x{out}x{k}"));
            assert_close(
                &by_dots(&xs, rows, &w, out, k),
                &want,
                &format!("dots {rows}x{out}x{k}"),
            );
        }
    }

    /// With int8 weights and per-column scales both kernels equal the product with the
    /// expanded weight.
    #[test]
    fn int8_kernels_match_the_expanded_weight() {
        for (rows, out, k) in SHAPES {
            let xs = values(rows * k, 3);
            let q: Vec<i8> = (0..out * k).map(|i| ((i * 37 + 11) % 255) as i32 as i8).collect();
            let scales: Vec<f32> = (0..out).map(|c| 0.01 + c as f32 * 1e-3).collect();
            let expanded: Vec<f32> = q.iter().enumerate().map(|(i, v)| *v as f32 * scales[i / k]).collect();
            let want = reference(&xs, rows, &expanded, out, k);
            let w = Weight {
                values: q.as_slice(),
                scales: Some(scales.as_slice()),
            };
            assert_close(&matmul_t(&xs, rows, &w, out, k), &want, &format!("{rows}x{out}x{k}"));
            assert_close(
                &by_dots(&xs, rows, &w, out, k),
                &want,
                &format!("dots {rows}x{out}x{k}"),
            );
        }
    }
}
