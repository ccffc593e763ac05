//! The GPU run: device setup, the copy-bandwidth reference, and per row the check and
//! the timing of each op.
//!
//! Timing: every op runs on the context's default stream (one stream, so cudarc
//! records no tracking events inside the timed region). Before each warm-up and each
//! timed run, a memset of the flush buffer (max(2 x L2, 256 MiB)) evicts the inputs
//! from L2 and keeps the GPU busy while the host queues the op; a CUDA event pair
//! brackets the op only. Buffers and the workspace are allocated before timing, so no
//! allocation is timed.
//!
//! Families (`--variant`): each op of a row runs by every family asked for in turn, forced
//! with `functional::set_tuning` (the context's table kept), the workspace grown to what
//! that family needs, then called once untimed (a family that cannot take the call says
//! so there, and is reported n/a), checked, and timed. The backward's saved statistics
//! come from the context's own training forward. The row's tuning is restored after it.
//!
//! SyncBatchNorm ops (`sync_*`) run one module per row on rank 0 of a world of one over
//! NCCL (one communicator per run, created at the first such op), forced to synchronise;
//! without a loadable libnccl they are n/a (a failure under
//! `CUDA_BATCHNORM_REQUIRE_NCCL=1`).

use std::rc::Rc;
use std::sync::Arc;

use cuda_batchnorm::cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaSlice, CudaStream, DeviceRepr,
};
use cuda_batchnorm::half::{bf16, f16};
use cuda_batchnorm::launch::{Tuning, TuningTable, Variant};
use cuda_batchnorm::sync::Nccl;
use cuda_batchnorm::{frozen, functional, BnError, DType, Float, ParamFor, Shape, Workspace};

use crate::check::{self, BackwardOut, Check, Sample, TrainOut};
use crate::data::{self, Inputs};
use crate::metrics;
use crate::ops::{FusedBuffers, OpBuffers, SyncModule, EPS};
use crate::suite::{Kind, Op, Row};
use crate::timing::{self, Timing};

/// Bytes of the device-to-device copy that calibrates `% copy` (at least 4 x L2).
pub const COPY_BYTES: usize = 1 << 30;
/// Smallest L2 flush.
pub const MIN_FLUSH_BYTES: usize = 256 << 20;

/// What the device is.
#[derive(Clone, Debug)]
pub struct DeviceSummary {
    /// Name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// `CUDA 13.0`.
    pub driver: String,
    /// Compute capability.
    pub cc: (i32, i32),
    /// Multiprocessors.
    pub sms: i32,
    /// L2 bytes.
    pub l2_bytes: usize,
}

/// One op of one row, by one kernel family (or the planner's choice).
#[derive(Clone, Debug)]
pub struct OpResult {
    /// The op.
    pub op: Op,
    /// The family forced (`None`: the planner's choice).
    pub variant: Option<Variant>,
    /// Why the forced family cannot take the call, when it cannot (not a failure:
    /// nothing ran, nothing was checked or timed).
    pub unavailable: Option<String>,
    /// Its timing, unless it failed.
    pub timing: Option<Timing>,
    /// Its check, unless skipped or failed before.
    pub check: Option<Check>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// Timing settings.
#[derive(Clone, Copy, Debug)]
pub struct RunConfig {
    /// Warm-up runs.
    pub warmup: usize,
    /// Timed runs.
    pub reps: usize,
    /// Seed of the inputs.
    pub seed: u64,
    /// Whether to check.
    pub check: bool,
    /// Whether to time (otherwise every op runs once and is checked, as on the emulated
    /// driver of a run without a GPU).
    pub timed: bool,
}

/// An open device with its stream, flush buffer and timing events.
pub struct Gpu {
    stream: Arc<CudaStream>,
    /// What the device is.
    pub summary: DeviceSummary,
    /// The L2 flush buffer; none on a device opened only to check.
    flush: Option<CudaSlice<u8>>,
    events: Vec<(CudaEvent, CudaEvent)>,
    /// The SyncBatchNorm ops' communicator (a world of one), or why there is none;
    /// made at the first such op.
    comm: Option<Result<Rc<Nccl>, String>>,
}

fn drv(what: &'static str) -> impl Fn(cuda_batchnorm::cudarc::driver::DriverError) -> String {
    move |e| format!("CUDA driver error {what}: {e}")
}

fn bn(e: BnError) -> String {
    e.to_string()
}

/// Why an op of one family did not run to the end.
#[derive(Clone)]
enum Failure {
    /// The family cannot take the call (`BnError::VariantUnavailable`): its reason.
    Unavailable(String),
    /// Anything else: a failure.
    Error(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Failure {
        Failure::Error(e)
    }
}

impl From<BnError> for Failure {
    fn from(e: BnError) -> Failure {
        match e {
            BnError::VariantUnavailable { reason, .. } => Failure::Unavailable(reason),
            e => Failure::Error(e.to_string()),
        }
    }
}

/// Why there is no GPU run, if there is none: no driver, no device, no PTX, or PTX
/// the driver refuses. Otherwise the open device, with its L2 flush buffer when it is
/// to time.
pub fn open(ordinal: usize, timed: bool) -> Result<Gpu, String> {
    let ptx = cuda_batchnorm::ptx_unavailable().map(|r| BnError::PtxUnavailable(r).to_string());
    let ctx = match cuda_batchnorm::open_device(ordinal) {
        Ok(ctx) => ctx,
        Err(e) => {
            return Err(match ptx {
                Some(p) => format!("{e}; also, {p}"),
                None => e.to_string(),
            })
        }
    };
    if let Some(p) = ptx {
        return Err(p);
    }
    let stream = ctx.default_stream();
    // Loads the kernels: a driver that refuses the PTX says so here.
    Workspace::for_shape(&stream, &Shape::nc(2, 1).map_err(bn)?, DType::F32).map_err(bn)?;
    let summary = summarise(&ctx)?;
    let flush = if timed {
        let flush_bytes = (2 * summary.l2_bytes).max(MIN_FLUSH_BYTES);
        Some(
            stream
                .alloc_zeros::<u8>(flush_bytes)
                .map_err(drv("allocating the L2 flush buffer"))?,
        )
    } else {
        None
    };
    Ok(Gpu {
        stream,
        summary,
        flush,
        events: Vec::new(),
        comm: None,
    })
}

fn summarise(ctx: &Arc<CudaContext>) -> Result<DeviceSummary, String> {
    let attr = |a| ctx.attribute(a).map_err(drv("reading a device attribute"));
    Ok(DeviceSummary {
        name: ctx.name().map_err(drv("reading the device name"))?,
        driver: cuda_batchnorm::driver_version()
            .map_or_else(|| "unknown".into(), |v| format!("CUDA {v}")),
        cc: ctx
            .compute_capability()
            .map_err(drv("reading the compute capability"))?,
        sms: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        l2_bytes: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(0) as usize,
    })
}

/// CUDA events on one stream, with the L2 flush buffer: the GPU side of
/// [`timing::Clock`].
struct Events<'a> {
    stream: &'a Arc<CudaStream>,
    flush: &'a mut CudaSlice<u8>,
    events: &'a mut Vec<(CudaEvent, CudaEvent)>,
}

impl timing::Clock for Events<'_> {
    fn flush(&mut self) -> Result<(), String> {
        self.stream
            .memset_zeros(self.flush)
            .map_err(drv("flushing L2"))
    }

    fn start(&mut self, i: usize) -> Result<(), String> {
        self.events[i]
            .0
            .record(self.stream)
            .map_err(drv("recording an event"))
    }

    fn end(&mut self, i: usize) -> Result<(), String> {
        self.events[i]
            .1
            .record(self.stream)
            .map_err(drv("recording an event"))
    }

    fn finish(&mut self, reps: usize) -> Result<Vec<f64>, String> {
        self.stream
            .synchronize()
            .map_err(drv("waiting for the timed runs"))?;
        self.events[..reps]
            .iter()
            .map(|(start, end)| {
                let ms = start
                    .elapsed_ms(end)
                    .map_err(drv("reading an event timer"))?;
                Ok(f64::from(ms) * 1e3)
            })
            .collect()
    }
}

/// Times `op` (see [`timing::run`]) with CUDA events, creating them as needed.
fn time(
    stream: &Arc<CudaStream>,
    flush: &mut Option<CudaSlice<u8>>,
    events: &mut Vec<(CudaEvent, CudaEvent)>,
    warmup: usize,
    reps: usize,
    op: impl FnMut() -> Result<(), String>,
) -> Result<Timing, String> {
    let flush = flush
        .as_mut()
        .ok_or("internal: a device opened only to check cannot time")?;
    let ctx = stream.context();
    while events.len() < reps {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = ctx.new_event(flags).map_err(drv("creating an event"))?;
        let end = ctx.new_event(flags).map_err(drv("creating an event"))?;
        events.push((start, end));
    }
    let mut clock = Events {
        stream,
        flush,
        events,
    };
    timing::run(&mut clock, warmup, reps, op)
}

impl Gpu {
    /// Bytes of the L2 flush.
    pub fn flush_bytes(&self) -> usize {
        self.flush.as_ref().map_or(0, |f| f.len())
    }

    /// Times a device-to-device copy of [`COPY_BYTES`] (less where memory is short, but
    /// at least 4 x L2); returns GB/s counting bytes read + written, and the size.
    pub fn copy_bandwidth(&mut self, cfg: &RunConfig) -> Result<(f64, usize, Timing), String> {
        let ctx = self.stream.context().clone();
        let (free, _) = ctx.mem_get_info().map_err(drv("reading free memory"))?;
        let mut bytes = COPY_BYTES;
        if free < 3 * bytes {
            bytes = ((free / 4) & !((1 << 20) - 1))
                .max(4 * self.summary.l2_bytes)
                .max(1 << 20);
        }
        let src = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(drv("allocating the copy source"))?;
        let mut dst = self
            .stream
            .alloc_zeros::<u8>(bytes)
            .map_err(drv("allocating the copy destination"))?;
        let stream = self.stream.clone();
        let t = time(
            &self.stream,
            &mut self.flush,
            &mut self.events,
            cfg.warmup,
            cfg.reps,
            || stream.memcpy_dtod(&src, &mut dst).map_err(drv("copying")),
        )?;
        Ok((metrics::gbps(2 * bytes as u64, t.median_us), bytes, t))
    }

    /// The communicator of the SyncBatchNorm ops: rank 0 of a world of one on this
    /// device. Without NCCL they are n/a, or a failure where NCCL is required.
    fn comm(&mut self) -> Result<Rc<Nccl>, Failure> {
        let ctx = self.stream.context().clone();
        let comm = self.comm.get_or_insert_with(|| {
            Nccl::unique_id()
                .and_then(|id| Nccl::from_rank(&ctx, 0, 1, id))
                .map(Rc::new)
                .map_err(|e| format!("no NCCL communicator: {e}"))
        });
        match comm {
            Ok(c) => Ok(c.clone()),
            Err(e) if std::env::var("CUDA_BATCHNORM_REQUIRE_NCCL").is_ok_and(|v| v == "1") => Err(
                Failure::Error(format!("{e} (CUDA_BATCHNORM_REQUIRE_NCCL=1)")),
            ),
            Err(e) => Err(Failure::Unavailable(e.clone())),
        }
    }

    /// Plans every later call with `table` (`--tuning-in`), keeping the rest of the
    /// context's tuning.
    pub fn use_table(&self, table: &'static TuningTable) -> Result<(), String> {
        let t = functional::tuning(&self.stream).map_err(bn)?;
        functional::set_tuning(
            &self.stream,
            Tuning {
                table: Some(table),
                ..t
            },
        )
        .map_err(bn)
    }

    /// Checks and times `ops` on one row, each op by every family of `choices` in turn
    /// (`None`: the planner's own choice), forced through `functional::set_tuning` with
    /// the rest of the context's tuning (its table) kept; the tuning is restored after
    /// the row. `progress` is called before each op and family.
    pub fn run_row(
        &mut self,
        row: &Row,
        ops: &[Op],
        choices: &[Option<Variant>],
        cfg: &RunConfig,
        progress: &mut dyn FnMut(Op, Option<Variant>),
    ) -> Vec<OpResult> {
        let base = match functional::tuning(&self.stream) {
            Ok(t) => t,
            Err(e) => return failed_row(ops, choices, &bn(e)),
        };
        let r = match row.dtype {
            DType::F32 => self.run_typed::<f32, f32>(row, ops, choices, base, cfg, progress),
            DType::F64 => self.run_typed::<f64, f64>(row, ops, choices, base, cfg, progress),
            DType::F16 => self.run_typed::<f16, f32>(row, ops, choices, base, cfg, progress),
            DType::BF16 => self.run_typed::<bf16, f32>(row, ops, choices, base, cfg, progress),
        };
        let restored = functional::set_tuning(&self.stream, base).map_err(bn);
        match (r, restored) {
            (Ok(results), Ok(())) => results,
            (Err(e), _) | (Ok(_), Err(e)) => failed_row(ops, choices, &e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_typed<T: Float, P: ParamFor<T>>(
        &mut self,
        row: &Row,
        ops: &[Op],
        choices: &[Option<Variant>],
        base: Tuning,
        cfg: &RunConfig,
        progress: &mut dyn FnMut(Op, Option<Variant>),
    ) -> Result<Vec<OpResult>, String> {
        let shape = row.shape()?;
        let s = self.stream.clone();
        let inputs = Inputs::<T, P>::new(cfg.seed, &shape);
        let chans = data::sample_channels(shape.c());
        let sample = (cfg.check || !cfg.timed).then(|| Sample::new(&inputs, &shape, &chans));
        let mut bufs = Buffers::<T, P>::new(&s, &shape, &inputs, ops)?;
        // The SyncBatchNorm module, or why its ops cannot run.
        let sync = if ops.iter().any(|o| o.is_sync()) {
            self.comm().and_then(|comm| {
                let (w, b) = (&inputs.weight, &inputs.bias);
                let (rm, rv) = (&inputs.running_mean, &inputs.running_var);
                bufs.sync = Some(SyncModule::new(&s, comm, w, b, rm, rv)?);
                Ok(())
            })
        } else {
            Ok(())
        };
        let tol = check::tolerance(T::DTYPE);
        let mut results = Vec::new();
        for &op in ops {
            // The statistics (and for an epilogue, the y) the backward differentiates
            // through, from the context's own choice of its training forward, whichever
            // family the backward is.
            let stats = match op.forward() {
                Some(fwd) => (|| -> Result<(), Failure> {
                    if fwd.is_sync() {
                        sync.clone()?;
                    }
                    functional::set_tuning(&s, base).map_err(bn)?;
                    bufs.ws
                        .reserve(
                            &s,
                            functional::workspace_size(&s, &shape, T::DTYPE).map_err(bn)?,
                        )
                        .map_err(bn)?;
                    bufs.reset_running(&s, &inputs)?;
                    bufs.call(&s, fwd).map_err(|e| {
                        Failure::Error(format!("the training forward before the backward: {e}"))
                    })
                })(),
                None => Ok(()),
            };
            for &choice in choices {
                progress(op, choice);
                let mut res = OpResult {
                    op,
                    variant: choice,
                    unavailable: None,
                    timing: None,
                    check: None,
                    error: None,
                };
                let outcome = (|| -> Result<(), Failure> {
                    if let (Some(_), Some(why)) = (choice, op.auto_only()) {
                        return Err(Failure::Unavailable(why.into()));
                    }
                    if op.is_sync() {
                        sync.clone()?;
                    }
                    stats.clone()?;
                    functional::set_tuning(
                        &s,
                        Tuning {
                            variant: choice,
                            ..base
                        },
                    )?;
                    // The family may need more workspace than the one sized before.
                    bufs.ws
                        .reserve(&s, functional::workspace_size(&s, &shape, T::DTYPE)?)?;
                    // The running statistics a forward's check starts from (a backward's
                    // forward has run: a module's forward would end with a change).
                    if op.kind() != Kind::Backward {
                        bufs.reset_running(&s, &inputs)?;
                    }
                    // The first call: a family that cannot take it says so here, before
                    // anything is checked or timed.
                    bufs.call(&s, op)?;
                    if let Some(sample) = &sample {
                        res.check = Some(bufs.check(&s, op, sample, &chans, tol)?);
                    }
                    if cfg.timed {
                        res.timing = Some(time(
                            &s,
                            &mut self.flush,
                            &mut self.events,
                            cfg.warmup,
                            cfg.reps,
                            || bufs.call(&s, op).map_err(bn),
                        )?);
                    }
                    Ok(())
                })();
                match outcome {
                    Ok(()) => {}
                    Err(Failure::Unavailable(why)) => res.unavailable = Some(why),
                    Err(Failure::Error(e)) => res.error = Some(e),
                }
                results.push(res);
            }
        }
        Ok(results)
    }
}

/// Every op and family of a row that could not be set up, failed with `e`.
fn failed_row(ops: &[Op], choices: &[Option<Variant>], e: &str) -> Vec<OpResult> {
    ops.iter()
        .flat_map(|&op| {
            choices.iter().map(move |&variant| OpResult {
                op,
                variant,
                unavailable: None,
                timing: None,
                check: None,
                error: Some(e.to_string()),
            })
        })
        .collect()
}

/// A per-channel buffer's values at `chans`, widened.
fn pick<E: Float>(
    s: &Arc<CudaStream>,
    b: &CudaSlice<E>,
    chans: &[usize],
) -> Result<Vec<f64>, String> {
    let host = s.clone_dtoh(b).map_err(drv("copying to the host"))?;
    Ok(data::pick(&check::wide(&host), chans))
}

/// A device buffer of `numel` elements repeating `pattern`: one upload, then doubling
/// device-to-device copies.
fn upload_tiled<E: Float>(
    s: &Arc<CudaStream>,
    pattern: &[E],
    numel: usize,
) -> Result<CudaSlice<E>, String> {
    let mut buf = s
        .alloc_zeros::<E>(numel)
        .map_err(drv("allocating an input"))?;
    let first = pattern.len().min(numel);
    if first == 0 {
        return Ok(buf);
    }
    s.memcpy_htod(&pattern[..first], &mut buf.slice_mut(0..first))
        .map_err(drv("uploading an input"))?;
    for (filled, n) in timing::doubling_copies(first, numel) {
        let (done, mut rest) = buf.split_at_mut(filled);
        s.memcpy_dtod(&done.slice(0..n), &mut rest.slice_mut(0..n))
            .map_err(drv("replicating an input"))?;
    }
    Ok(buf)
}

#[derive(Clone, Copy)]
enum Which {
    Y,
    Dx,
    Dz,
}

/// Every buffer of one row.
type Buffers<T, P> = OpBuffers<T, P>;

impl<T: Float, P: ParamFor<T>> OpBuffers<T, P> {
    /// The buffers `ops` need: the backward's when one is a backward, the fused ops'
    /// when one is not plain.
    fn new(
        s: &Arc<CudaStream>,
        shape: &Shape,
        inputs: &Inputs<T, P>,
        ops: &[Op],
    ) -> Result<Self, String> {
        let backward = ops.iter().any(|o| o.kind() == Kind::Backward);
        let (numel, c) = (shape.numel(), shape.c());
        let alloc = drv("allocating a buffer");
        let up = |v: &[P]| s.clone_htod(v).map_err(drv("uploading parameters"));
        let fused = if ops.iter().all(|o| o.is_plain() || o.is_sync()) {
            None
        } else {
            let acc = |v: &[T::Acc]| s.clone_htod(v).map_err(drv("uploading coefficients"));
            let one = <T::Acc as Float>::from_f64(1.0);
            let mut identity = vec![one; c];
            identity.resize(2 * c, <T::Acc as Float>::from_f64(0.0));
            let frozen = frozen::coefficients::<P, T::Acc>(
                Some(&inputs.weight),
                Some(&inputs.bias),
                &inputs.running_mean,
                &inputs.running_var,
                EPS,
            )
            .map_err(bn)?;
            Some(FusedBuffers {
                z: upload_tiled(s, &inputs.z, numel)?,
                tmp: s.alloc_zeros::<T>(numel).map_err(&alloc)?,
                dz: s.alloc_zeros::<T>(numel).map_err(&alloc)?,
                identity: acc(&identity)?,
                frozen: acc(&frozen)?,
            })
        };
        Ok(OpBuffers {
            shape: *shape,
            x: upload_tiled(s, &inputs.x, numel)?,
            y: s.alloc_zeros::<T>(numel).map_err(&alloc)?,
            dy: if backward {
                Some(upload_tiled(s, &inputs.dy, numel)?)
            } else {
                None
            },
            dx: if backward {
                Some(s.alloc_zeros::<T>(numel).map_err(&alloc)?)
            } else {
                None
            },
            w: up(&inputs.weight)?,
            b: up(&inputs.bias)?,
            rm: up(&inputs.running_mean)?,
            rv: up(&inputs.running_var)?,
            sm: s.alloc_zeros::<T::Acc>(c).map_err(&alloc)?,
            si: s.alloc_zeros::<T::Acc>(c).map_err(&alloc)?,
            gw: s.alloc_zeros::<P>(c).map_err(&alloc)?,
            gb: s.alloc_zeros::<P>(c).map_err(&alloc)?,
            ws: Workspace::for_shape(s, shape, T::DTYPE).map_err(bn)?,
            fused,
            sync: None,
        })
    }

    /// Runs `op` once.
    fn call(&mut self, s: &Arc<CudaStream>, op: Op) -> Result<(), BnError> {
        if let Some(verify) = op.sync_verify() {
            return match op.kind() {
                Kind::Backward => self.sync_backward(verify),
                _ => self.sync_train(verify),
            };
        }
        match (op.kind(), op.epilogue(), op.is_sequence()) {
            (Kind::Train, None, _) => self.train(s),
            (Kind::Eval, None, _) => self.eval(s),
            (Kind::Backward, None, _) => self.backward(s),
            (Kind::Frozen, _, _) => self.frozen_eval(s),
            (Kind::Eval, Some(e), false) => self.eval_fused(s, e),
            (Kind::Eval, Some(e), true) => self.eval_seq(s, e),
            (Kind::Train, Some(e), false) => self.train_fused(s, e),
            (Kind::Train, Some(e), true) => self.train_seq(s, e),
            (Kind::Backward, Some(e), false) => self.backward_fused(s, e),
            (Kind::Backward, Some(_), true) => self.backward_seq(s),
        }
    }

    /// Checks what the last call of `op` wrote, at the sampled channels.
    fn check(
        &self,
        s: &Arc<CudaStream>,
        op: Op,
        sample: &Sample,
        chans: &[usize],
        tol: f64,
    ) -> Result<Check, String> {
        let epi = op.epilogue();
        // A SyncBatchNorm op's statistics are its module's.
        let (sm, si, rm, rv) = match (op.is_sync(), &self.sync) {
            (false, _) => (&self.sm, &self.si, &self.rm, &self.rv),
            (true, Some(m)) => {
                let local = m.module.local();
                let no = "internal: the SyncBatchNorm module has no";
                let saved = local.saved_mean().zip(local.saved_invstd());
                let (sm, si) = saved.ok_or_else(|| format!("{no} saved statistics"))?;
                let rm = local
                    .running_mean()
                    .ok_or_else(|| format!("{no} running mean"))?;
                let rv = local
                    .running_var()
                    .ok_or_else(|| format!("{no} running variance"))?;
                (sm, si, rm, rv)
            }
            (true, None) => return Err("internal: no SyncBatchNorm module".into()),
        };
        Ok(match op.kind() {
            Kind::Train => {
                let out = TrainOut {
                    y: self.gather(s, Which::Y, chans)?,
                    save_mean: pick(s, sm, chans)?,
                    save_invstd: pick(s, si, chans)?,
                    running_mean: pick(s, rm, chans)?,
                    running_var: pick(s, rv, chans)?,
                };
                check::check_train_fused(sample, &out, epi, tol)
            }
            Kind::Eval | Kind::Frozen => {
                check::check_eval_fused(sample, &self.gather(s, Which::Y, chans)?, epi, tol)
            }
            Kind::Backward => {
                let out = BackwardOut {
                    dx: self.gather(s, Which::Dx, chans)?,
                    grad_weight: pick(s, &self.gw, chans)?,
                    grad_bias: pick(s, &self.gb, chans)?,
                };
                let (sm, si) = (pick(s, sm, chans)?, pick(s, si, chans)?);
                if epi.is_none() {
                    check::check_backward(sample, &sm, &si, &out, tol)
                } else {
                    let y = self.gather(s, Which::Y, chans)?;
                    let dz = if op == Op::BackwardAddRelu {
                        Some(self.gather(s, Which::Dz, chans)?)
                    } else {
                        None
                    };
                    check::check_backward_fused(sample, &y, &sm, &si, &out, dz.as_deref(), tol)
                }
            }
        })
    }

    fn reset_running(&mut self, s: &Arc<CudaStream>, inputs: &Inputs<T, P>) -> Result<(), String> {
        if let Some(sync) = &mut self.sync {
            sync.reset().map_err(bn)?;
        }
        s.memcpy_htod(&inputs.running_mean, &mut self.rm)
            .map_err(drv("uploading running statistics"))?;
        s.memcpy_htod(&inputs.running_var, &mut self.rv)
            .map_err(drv("uploading running statistics"))
    }

    /// The sampled channels of y or dx, widened.
    fn gather(
        &self,
        s: &Arc<CudaStream>,
        which: Which,
        chans: &[usize],
    ) -> Result<Vec<f64>, String> {
        let buf = match which {
            Which::Y => &self.y,
            Which::Dx => self.dx.as_ref().ok_or("internal: no dx buffer")?,
            Which::Dz => &self.fused.as_ref().ok_or("internal: no dz buffer")?.dz,
        };
        data::gather(&self.shape, chans, |a, n| fetch(s, buf, a, n))
    }
}

fn fetch<E: Float + DeviceRepr>(
    s: &Arc<CudaStream>,
    buf: &CudaSlice<E>,
    start: usize,
    len: usize,
) -> Result<Vec<f64>, String> {
    let v = s
        .clone_dtoh(&buf.slice(start..start + len))
        .map_err(drv("copying to the host"))?;
    Ok(check::wide(&v))
}
