//! The device buffers of one benchmark problem and the three timed operations on them.
//! Shared by bnbench (`gpu.rs`) and the criterion benches (`benches/batchnorm.rs`
//! includes this file), so both time exactly the same calls.

use std::sync::Arc;

use cuda_batchnorm::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cuda_batchnorm::{functional, BnError, Float, ParamFor, Shape, Workspace};

/// eps of every timed call.
pub const EPS: f64 = 1e-5;
/// momentum of every timed call.
pub const MOMENTUM: f64 = 0.1;

/// Every buffer of one problem. `dy` and `dx` exist only when the backward is wanted.
pub struct OpBuffers<T: Float, P: ParamFor<T>> {
    pub shape: Shape,
    pub x: CudaSlice<T>,
    pub y: CudaSlice<T>,
    pub dy: Option<CudaSlice<T>>,
    pub dx: Option<CudaSlice<T>>,
    pub w: CudaSlice<P>,
    pub b: CudaSlice<P>,
    pub rm: CudaSlice<P>,
    pub rv: CudaSlice<P>,
    pub sm: CudaSlice<T::Acc>,
    pub si: CudaSlice<T::Acc>,
    pub gw: CudaSlice<P>,
    pub gb: CudaSlice<P>,
    pub ws: Workspace,
}

impl<T: Float, P: ParamFor<T>> OpBuffers<T, P> {
    /// The training forward: batch statistics, running-statistics update, saved
    /// statistics.
    pub fn train(&mut self, s: &Arc<CudaStream>) -> Result<(), BnError> {
        let OpBuffers {
            shape,
            x,
            y,
            w,
            b,
            rm,
            rv,
            sm,
            si,
            ws,
            ..
        } = self;
        functional::batch_norm(
            s,
            functional::Forward {
                input: &*x,
                shape: *shape,
                running_mean: Some(rm as &mut dyn DevicePtrMut<P>),
                running_var: Some(rv as &mut dyn DevicePtrMut<P>),
                weight: Some(&*w as &dyn DevicePtr<P>),
                bias: Some(&*b as &dyn DevicePtr<P>),
                training: true,
                momentum: MOMENTUM,
                eps: EPS,
            },
            y,
            Some(functional::SaveStats {
                mean: sm,
                invstd: si,
            }),
            ws,
        )
    }

    /// The eval forward with the running statistics.
    pub fn eval(&mut self, s: &Arc<CudaStream>) -> Result<(), BnError> {
        let OpBuffers {
            shape,
            x,
            y,
            w,
            b,
            rm,
            rv,
            ..
        } = self;
        functional::batch_norm_eval(
            s,
            functional::Eval {
                input: &*x,
                shape: *shape,
                running_mean: &*rm,
                running_var: &*rv,
                weight: Some(&*w as &dyn DevicePtr<P>),
                bias: Some(&*b as &dyn DevicePtr<P>),
                eps: EPS,
            },
            y,
        )
    }

    /// The training backward through the saved statistics: dx, dweight, dbias.
    pub fn backward(&mut self, s: &Arc<CudaStream>) -> Result<(), BnError> {
        let OpBuffers {
            shape,
            x,
            dy,
            dx,
            w,
            sm,
            si,
            gw,
            gb,
            ws,
            ..
        } = self;
        let (Some(dy), Some(dx)) = (dy.as_ref(), dx.as_mut()) else {
            return Err(BnError::Backward(
                "the backward's buffers were not allocated",
            ));
        };
        functional::batch_norm_backward(
            s,
            functional::Backward {
                grad_output: dy,
                input: &*x,
                shape: *shape,
                weight: Some(&*w as &dyn DevicePtr<P>),
                stats: functional::BackwardStats::Batch {
                    save_mean: &*sm,
                    save_invstd: &*si,
                },
            },
            functional::Grads {
                input: dx,
                weight: Some(gw as &mut dyn DevicePtrMut<P>),
                bias: Some(gb as &mut dyn DevicePtrMut<P>),
            },
            ws,
        )
    }
}
