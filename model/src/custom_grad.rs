//! Ops whose forward runs outside candle's graph (a fused kernel, or blocks of work) and whose
//! backward is ours, entered into the graph as custom ops.
//!
//! candle's fused kernels (RMSNorm, RoPE) have no backward, and building the same function
//! from basic ops keeps several full-size intermediates per op for the backward pass and
//! launches many more kernels. Here the forward result is computed first; the custom op's forward
//! hands over a copy of it and lets it go, and its backward is written with tensor ops.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Shape, Storage, Tensor,
};
use std::sync::Mutex;

/// The input's gradient of a one-input op, given the input and the output's gradient.
///
/// The backward gets its tensors detached. A gradient computed from the graph's own tensors
/// carries a graph of its own that holds them, and candle keeps a variable's gradient as it is
/// returned: each adapter gradient held an f32 copy of its projection's input and output
/// gradient alive until the step's gradients were dropped, about as much again as the forward
/// activations (e2e/bench/step-memory.sh).
pub(crate) trait Backward: Send + Sync + 'static {
    const NAME: &'static str;
    fn backward(&self, x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor>;
}

/// The gradients of a two-input op's inputs, given the inputs and the output's gradient.
pub(crate) trait Backward2: Send + Sync + 'static {
    const NAME: &'static str;
    fn backward(&self, args: [&Tensor; 2], grad: &Tensor) -> candle_core::Result<(Tensor, Tensor)>;
}

/// The gradients of a three-input op's inputs, given the inputs, its output and the output's
/// gradient.
pub(crate) trait Backward3: Send + Sync + 'static {
    const NAME: &'static str;
    fn backward(
        &self,
        args: [&Tensor; 3],
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)>;
}

/// `out`, computed from `x` outside the graph, as a node of `x`'s graph whose backward is `b`.
/// Outside a graph, `out` itself.
pub(crate) fn with_backward<B: Backward>(x: &Tensor, out: Tensor, b: B) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return Ok(out);
    }
    x.apply_op1(Precomputed::new(out, b))
}

/// As [`with_backward`], for an op of two inputs.
pub(crate) fn with_backward2<B: Backward2>(args: [&Tensor; 2], out: Tensor, b: B) -> candle_core::Result<Tensor> {
    if !args.iter().any(|t| t.track_op()) {
        return Ok(out);
    }
    args[0].apply_op2(args[1], Precomputed::new(out, b))
}

/// As [`with_backward`], for an op of three inputs.
pub(crate) fn with_backward3<B: Backward3>(args: [&Tensor; 3], out: Tensor, b: B) -> candle_core::Result<Tensor> {
    if !args.iter().any(|t| t.track_op()) {
        return Ok(out);
    }
    args[0].apply_op3(args[1], args[2], Precomputed::new(out, b))
}

/// The result, handed over once by the op's forward, and the backward. The op lives in the
/// graph until the backward pass, so it lets go of its result when it has handed it over:
/// held on, each custom op's output was kept twice.
struct Precomputed<B> {
    out: Mutex<Option<Tensor>>,
    backward: B,
}

impl<B> Precomputed<B> {
    fn new(out: Tensor, backward: B) -> Self {
        Self {
            out: Mutex::new(Some(out)),
            backward,
        }
    }

    /// A copy of the result's storage on the device `pick` selects; the result itself is let
    /// go. candle gives a custom op's forward no way to return a tensor it already has.
    fn hand_over<S: BackendStorage>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> candle_core::Result<(S, Shape)> {
        let out = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("custom op: result lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("custom op: forward ran twice".into()))?;
        let (storage, layout) = out.storage_and_layout();
        let s = pick(&storage).ok_or_else(|| candle_core::Error::Msg("custom op: result on another device".into()))?;
        Ok((s.try_clone(layout)?, out.shape().clone()))
    }
}

pub(crate) fn cpu(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

pub(crate) fn cuda(s: &Storage) -> Option<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

pub(crate) fn metal(s: &Storage) -> Option<&MetalStorage> {
    match s {
        Storage::Metal(s) => Some(s),
        _ => None,
    }
}

impl<B: Backward> CustomOp1 for Precomputed<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.hand_over(cpu)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.hand_over(cuda)
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> candle_core::Result<(MetalStorage, Shape)> {
        self.hand_over(metal)
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward.backward(&x.detach(), grad)?))
    }
}

impl<B: Backward2> CustomOp2 for Precomputed<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.hand_over(cpu)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.hand_over(cuda)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        self.hand_over(metal)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = self.backward.backward([&a.detach(), &b.detach()], grad)?;
        Ok((Some(da), Some(db)))
    }
}

impl<B: Backward3> CustomOp3 for Precomputed<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.hand_over(cpu)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.hand_over(cuda)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        self.hand_over(metal)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db, dc) = self
            .backward
            .backward([&a.detach(), &b.detach(), &c.detach()], &out.detach(), grad)?;
        Ok((Some(da), Some(db), Some(dc)))
    }
}
