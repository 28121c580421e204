//! AdamW's update on burn's wgpu backend in one kernel per parameter (`shaders/adamw.wgsl`).
//!
//! burn's `AdamW` updates each parameter with about a dozen element-wise tensor ops, each its own GPU
//! dispatch; with ~250 parameter tensors that was some 3,000 of a tiny training step's ~8,000 kernel
//! launches (`ov3 bench step --kernels count`), and on a GPU a launch costs microseconds whatever it
//! carries (docs/PERFORMANCE.md "On a GPU"). [`optim::AdamW`](crate::optim::AdamW) calls [`adamw`] for f32
//! parameters on a wgpu device, as it calls `cpu_ops::adamw` on flex; its state is burn's either way.
//! `core/tests/adamw_gpu.rs` checks it against float64 code and against burn's AdamW.

use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::{CubeBackend, CubeDim, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous};
use burn::backend::{Backend, DType, Dispatch, DispatchDevice, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use cubecl::CubeCount;
use cubecl::prelude::KernelId;
use cubecl::server::KernelArguments;

pub use crate::cpu_ops::AdamWStep;

const SOURCE: &str = include_str!("../../shaders/adamw.wgsl");
/// Invocations per workgroup (`WG` in the shader).
const WORKGROUP: u32 = 256;
/// Workgroups per grid dimension (WebGPU's minimum limit).
const MAX_GROUPS: u32 = 65_535;

/// The kernel on the backend that runs it: cubecl's, or (with burn's `fusion` feature) the fusion backend
/// around it, which queues it as an opaque operation.
#[backend_extension(Cube, Fusion: cfg(feature = "fusion"))]
pub trait AdamWKernel: Backend {
    /// `(param, moment_1, moment_2)` after one AdamW step with `grad`; all f32, of one shape.
    #[fusion(meta = |param, _grad, moment_1, moment_2, _step| (param.clone(), moment_1.clone(), moment_2.clone()))]
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Whether [`adamw`] can step `param` with `grad`: f32 tensors on a wgpu device (the optimiser's tensors
/// are plain, not autodiff), not empty.
pub fn supports<const D: usize>(param: &Tensor<D>, grad: &Tensor<D>) -> bool {
    param.dtype() == DType::F32
        && grad.dtype() == DType::F32
        && param.shape().num_elements() > 0
        && matches!(param.device().inner().as_dispatch(), DispatchDevice::Cube(_))
}

/// One AdamW step in one kernel: `(param, moment_1, moment_2)` after it. Call only where [`supports`]
/// holds, with f32 moments of `param`'s shape.
pub fn adamw<const D: usize>(
    step: AdamWStep,
    param: Tensor<D>,
    grad: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, m, v) = <Dispatch as AdamWKernel>::adamw_step(
        param.into_dispatch(),
        grad.into_dispatch(),
        moment_1.into_dispatch(),
        moment_2.into_dispatch(),
        step,
    );
    (Tensor::from_dispatch(p), Tensor::from_dispatch(m), Tensor::from_dispatch(v))
}

struct AdamWSource;

impl KernelSource for AdamWSource {
    fn source(&self) -> SourceTemplate {
        SourceTemplate::new(SOURCE)
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>()
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

impl AdamWKernel for CubeBackend {
    fn adamw_step(
        param: CubeTensor,
        grad: CubeTensor,
        moment_1: CubeTensor,
        moment_2: CubeTensor,
        step: AdamWStep,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let shape = param.shape();
        let n = shape.num_elements();
        for (what, t) in [("gradient", &grad), ("moment 1", &moment_1), ("moment 2", &moment_2)] {
            assert!(t.shape() == shape, "adamw: the {what} is {:?}, the parameter {shape:?}", t.shape());
        }
        assert!(
            [&param, &grad, &moment_1, &moment_2].iter().all(|t| t.dtype == DType::F32),
            "adamw: the kernel steps f32 tensors"
        );
        let n32 = u32::try_from(n).expect("adamw: a parameter of more than 2^32 elements");
        let [param, grad, moment_1, moment_2] = [param, grad, moment_1, moment_2].map(into_contiguous);
        let h = [
            step.lr,
            step.beta_1,
            step.beta_2,
            step.epsilon,
            step.decay,
            step.correction_1,
            step.correction_2,
            f32::from_bits(n32),
        ];
        let client = param.client.clone();
        let bytes: Vec<u8> = h.iter().flat_map(|x| x.to_le_bytes()).collect();
        let h = client.create_from_slice(&bytes);
        let output = || {
            let handle = client.empty(n * 4);
            CubeTensor::new_contiguous(client.clone(), param.device.clone(), shape.clone(), handle, DType::F32)
        };
        let (p_out, m_out, v_out) = (output(), output(), output());
        let groups = n.div_ceil(WORKGROUP as usize) as u32;
        let (x, y) = (groups.min(MAX_GROUPS), groups.div_ceil(MAX_GROUPS));
        let args = [&param, &grad, &moment_1, &moment_2]
            .iter()
            .fold(KernelArguments::new(), |args, t| args.with_buffer(t.handle.clone().binding()))
            .with_buffer(h.binding());
        let args = [&p_out, &m_out, &v_out].iter().fold(args, |args, t| args.with_buffer(t.handle.clone().binding()));
        client.launch(
            Box::new(SourceKernel::new(AdamWSource, CubeDim::new_1d(WORKGROUP))),
            CubeCount::Static(x, y, 1),
            args,
        );
        (p_out, m_out, v_out)
    }
}
