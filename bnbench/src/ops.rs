//! The device buffers of one benchmark problem and the timed operations on them: the
//! three plain ones, (with [`FusedBuffers`]) the frozen eval, the fused epilogues
//! (`relu(bn(x))`, `relu(bn(x) + z)`) in eval, training forward and backward, and our own
//! unfused sequences of the same computations, which the fused calls are measured
//! against, and (with [`SyncModule`]) SyncBatchNorm's training forward and backward on
//! one rank. Shared by bnbench (`gpu.rs`) and the criterion benches
//! (`benches/batchnorm.rs` includes this file), so both time exactly the same calls.

use std::rc::Rc;
use std::sync::Arc;

use cuda_batchnorm::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cuda_batchnorm::sync::{Nccl, SyncBatchNorm, SyncOptions};
use cuda_batchnorm::{functional, BatchNormOptions, BnError, Float, ParamFor, Shape};
use cuda_batchnorm::{StateDict, Workspace};

/// eps of every timed call.
pub const EPS: f64 = 1e-5;
/// momentum of every timed call.
pub const MOMENTUM: f64 = 0.1;

/// The epilogue of a fused op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epi {
    /// `relu(bn(x))`.
    Relu,
    /// `relu(bn(x) + z)`.
    AddRelu,
}

/// The buffers only the frozen and fused ops use.
pub struct FusedBuffers<T: Float> {
    /// The residual z.
    pub z: CudaSlice<T>,
    /// The unfused sequences' intermediate: BatchNorm's output before the ReLU pass, or
    /// the masked dy before the backward.
    pub tmp: CudaSlice<T>,
    /// The residual's gradient of the fused add-ReLU backward.
    pub dz: CudaSlice<T>,
    /// `Acc[2C]`: scale 1, shift 0. The frozen kernel with these coefficients is a plain
    /// ReLU (add-ReLU) pass forward and `threshold_backward` backward: the unfused
    /// sequences' second op, which moves the bytes a separate activation kernel would.
    pub identity: CudaSlice<T::Acc>,
    /// `Acc[2C]`: the frozen coefficients of the running statistics, weight and bias.
    pub frozen: CudaSlice<T::Acc>,
}

/// SyncBatchNorm on rank 0 of a world of one over NCCL, forced to synchronise (on one
/// rank PyTorch's module, and ours by default, is the plain BatchNorm), with the
/// problem's parameters and running statistics. Its outputs go to the problem's `y`,
/// `dx`, `gw` and `gb`; its running and saved statistics stay in the module.
pub struct SyncModule<T: Float, P: ParamFor<T>> {
    pub module: SyncBatchNorm<T, P, Rc<Nccl>>,
    /// The running statistics every training forward starts from.
    initial: StateDict<P>,
}

impl<T: Float, P: ParamFor<T>> SyncModule<T, P> {
    /// The module over `comm` with the given parameters and running statistics
    /// (`eps` and `momentum` those of every timed call).
    pub fn new(
        s: &Arc<CudaStream>,
        comm: Rc<Nccl>,
        weight: &[P],
        bias: &[P],
        running_mean: &[P],
        running_var: &[P],
    ) -> Result<Self, BnError> {
        let options = BatchNormOptions {
            eps: EPS,
            momentum: Some(MOMENTUM),
            ..BatchNormOptions::default()
        };
        let mut module = SyncBatchNorm::new(s, weight.len(), options, comm)?;
        let initial = StateDict {
            weight: Some(weight.to_vec()),
            bias: Some(bias.to_vec()),
            running_mean: Some(running_mean.to_vec()),
            running_var: Some(running_var.to_vec()),
            num_batches_tracked: Some(0),
        };
        module.local_mut().load_state_dict(&initial)?;
        Ok(SyncModule { module, initial })
    }

    /// Back to the initial running statistics (which ends the last forward's claim on
    /// a backward, as any change of them does).
    pub fn reset(&mut self) -> Result<(), BnError> {
        self.module.local_mut().load_state_dict(&self.initial)
    }

    fn forced(&mut self, verify: bool) {
        self.module.set_sync_options(SyncOptions {
            verify,
            force: true,
        });
    }
}

/// Every buffer of one problem. `dy` and `dx` exist only when the backward is wanted,
/// `fused` only when a frozen or fused op is, `sync` only when a SyncBatchNorm op is.
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
    pub fused: Option<FusedBuffers<T>>,
    pub sync: Option<SyncModule<T, P>>,
}

fn no_fused_buffers() -> BnError {
    BnError::Backward("the fused ops' buffers were not allocated")
}

fn no_sync_module() -> BnError {
    BnError::Backward("the SyncBatchNorm module was not set up")
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

    /// The frozen eval `y = x * scale + shift`, its coefficients precomputed.
    pub fn frozen_eval(&mut self, s: &Arc<CudaStream>) -> Result<(), BnError> {
        let f = self.fused.as_ref().ok_or_else(no_fused_buffers)?;
        functional::batch_norm_frozen(
            s,
            functional::Frozen {
                input: &self.x,
                shape: self.shape,
                scale_shift: &f.frozen,
            },
            &mut self.y,
        )
    }

    /// The eval forward with `epi` fused: one pass, x (and z) read, y written.
    pub fn eval_fused(&mut self, s: &Arc<CudaStream>, epi: Epi) -> Result<(), BnError> {
        let OpBuffers {
            shape,
            x,
            y,
            w,
            b,
            rm,
            rv,
            fused,
            ..
        } = self;
        let f = fused.as_ref().ok_or_else(no_fused_buffers)?;
        functional::batch_norm_eval_fused(
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
            Some(epilogue(epi, &f.z)),
            y,
        )
    }

    /// The same computation unfused: the eval forward into `tmp`, then the ReLU
    /// (add-ReLU) pass from `tmp` into y.
    pub fn eval_seq(&mut self, s: &Arc<CudaStream>, epi: Epi) -> Result<(), BnError> {
        let mut f = self.fused.take().ok_or_else(no_fused_buffers)?;
        std::mem::swap(&mut self.y, &mut f.tmp);
        let r = self.eval(s);
        std::mem::swap(&mut self.y, &mut f.tmp);
        let r = r.and_then(|()| self.activation(s, &f, epi));
        self.fused = Some(f);
        r
    }

    /// The training forward with `epi` fused into its normalise pass.
    pub fn train_fused(&mut self, s: &Arc<CudaStream>, epi: Epi) -> Result<(), BnError> {
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
            fused,
            ..
        } = self;
        let f = fused.as_ref().ok_or_else(no_fused_buffers)?;
        functional::batch_norm_fused(
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
            Some(epilogue(epi, &f.z)),
            y,
            Some(functional::SaveStats {
                mean: sm,
                invstd: si,
            }),
            ws,
        )
    }

    /// The same computation unfused: the training forward into `tmp`, then the ReLU
    /// (add-ReLU) pass from `tmp` into y.
    pub fn train_seq(&mut self, s: &Arc<CudaStream>, epi: Epi) -> Result<(), BnError> {
        let mut f = self.fused.take().ok_or_else(no_fused_buffers)?;
        std::mem::swap(&mut self.y, &mut f.tmp);
        let r = self.train(s);
        std::mem::swap(&mut self.y, &mut f.tmp);
        let r = r.and_then(|()| self.activation(s, &f, epi));
        self.fused = Some(f);
        r
    }

    /// `y = relu(tmp)` or `relu(tmp + z)`: the frozen kernel with the identity
    /// coefficients.
    fn activation(
        &mut self,
        s: &Arc<CudaStream>,
        f: &FusedBuffers<T>,
        epi: Epi,
    ) -> Result<(), BnError> {
        functional::batch_norm_frozen_fused(
            s,
            functional::Frozen {
                input: &f.tmp,
                shape: self.shape,
                scale_shift: &f.identity,
            },
            Some(epilogue(epi, &f.z)),
            &mut self.y,
        )
    }

    /// The backward of the fused training forward whose output is in y: the ReLU mask
    /// recovered from y, dx, dweight, dbias, and for add-ReLU the residual's gradient
    /// in `dz`.
    pub fn backward_fused(&mut self, s: &Arc<CudaStream>, epi: Epi) -> Result<(), BnError> {
        let OpBuffers {
            shape,
            x,
            y,
            dy,
            dx,
            w,
            sm,
            si,
            gw,
            gb,
            ws,
            fused,
            ..
        } = self;
        let (Some(dy), Some(dx), Some(f)) = (dy.as_ref(), dx.as_mut(), fused.as_mut()) else {
            return Err(BnError::Backward(
                "the fused backward's buffers were not allocated",
            ));
        };
        let grad = match epi {
            Epi::Relu => functional::EpilogueGrad::Relu { output: &*y },
            Epi::AddRelu => functional::EpilogueGrad::AddRelu {
                output: &*y,
                grad_residual: &mut f.dz,
            },
        };
        functional::batch_norm_backward_fused(
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
            Some(grad),
            functional::Grads {
                input: dx,
                weight: Some(gw as &mut dyn DevicePtrMut<P>),
                bias: Some(gb as &mut dyn DevicePtrMut<P>),
            },
            ws,
        )
    }

    /// SyncBatchNorm's training forward on one rank, forced to synchronise, with or
    /// without its verifying exchange, into y.
    pub fn sync_train(&mut self, verify: bool) -> Result<(), BnError> {
        let sync = self.sync.as_mut().ok_or_else(no_sync_module)?;
        sync.forced(verify);
        sync.module.forward_into(&self.x, &self.shape, &mut self.y)
    }

    /// Its backward (after its forward) into dx, dweight and dbias.
    pub fn sync_backward(&mut self, verify: bool) -> Result<(), BnError> {
        let OpBuffers {
            shape,
            x,
            dy,
            dx,
            gw,
            gb,
            sync,
            ..
        } = self;
        let (Some(dy), Some(dx)) = (dy.as_ref(), dx.as_mut()) else {
            return Err(BnError::Backward(
                "the backward's buffers were not allocated",
            ));
        };
        let sync = sync.as_mut().ok_or_else(no_sync_module)?;
        sync.forced(verify);
        sync.module.backward_into(
            dy,
            &*x,
            shape,
            dx,
            Some(gw as &mut dyn DevicePtrMut<P>),
            Some(gb as &mut dyn DevicePtrMut<P>),
        )
    }

    /// The same computation unfused: `threshold_backward` (dy masked by y, into `tmp`),
    /// then the backward with `tmp` as dy. `tmp` is also the residual's gradient of
    /// add-ReLU (an add hands its gradient on as is), so this is the unfused sequence of
    /// both epilogues.
    pub fn backward_seq(&mut self, s: &Arc<CudaStream>) -> Result<(), BnError> {
        let mut f = self.fused.take().ok_or_else(no_fused_buffers)?;
        let r = (|| {
            let dy = self.dy.as_ref().ok_or_else(no_fused_buffers)?;
            functional::batch_norm_frozen_backward_fused(
                s,
                functional::Frozen {
                    input: dy,
                    shape: self.shape,
                    scale_shift: &f.identity,
                },
                Some(functional::EpilogueGrad::Relu { output: &self.y }),
                &mut f.tmp,
            )?;
            std::mem::swap(self.dy.as_mut().ok_or_else(no_fused_buffers)?, &mut f.tmp);
            let r = self.backward(s);
            std::mem::swap(self.dy.as_mut().ok_or_else(no_fused_buffers)?, &mut f.tmp);
            r
        })();
        self.fused = Some(f);
        r
    }
}

/// The forward epilogue `epi` with the residual `z`.
fn epilogue<T: Float>(epi: Epi, z: &CudaSlice<T>) -> functional::Epilogue<'_, T> {
    match epi {
        Epi::Relu => functional::Epilogue::Relu,
        Epi::AddRelu => functional::Epilogue::AddRelu { residual: z },
    }
}
