//! The kernels checked through the emulated CUDA driver (`cuda-batchnorm-emu`) in a run
//! without a GPU.
//!
//! cudarc binds to the first `libcuda` it loads, for the life of the process: where a
//! real driver is installed but unusable (no device, PTX refused) this process is
//! already bound to it. So the check runs in a child process, this same executable with
//! the hidden flag `--emulated-child`, which loads the emulated driver
//! (`driver::preload`, and the emulated NCCL for the SyncBatchNorm ops) before anything
//! touches cudarc, then runs the selected rows and ops once each through the ordinary
//! GPU path (`crate::gpu`, untimed) and checks them against the f64 reference. The request goes to its stdin and the records come back on
//! its stdout, both as JSON; its progress goes to stderr.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use cuda_batchnorm::launch::Variant;
use cuda_batchnorm::DType;
use cuda_batchnorm_emu::driver;
use serde::{Deserialize, Serialize};

use crate::check::{self, CheckRecord};
use crate::gpu;
use crate::nogpu::{self, EmulatedOutcome as Outcome, EMULATED};
use crate::suite::{dims_label, parse_layout, Op, Row};
use crate::tuning;

/// The flag that makes bnbench the child.
pub const CHILD_FLAG: &str = "--emulated-child";

/// Environment variables that make the emulated driver play a broken one (no device, an
/// old driver): they describe the hardware a test pretends to have, not the emulator the
/// check needs, so the child does not inherit them.
const DRIVER_KNOBS: [&str; 2] = ["BN_EMU_DRIVER_DEVICES", "BN_EMU_DRIVER_VERSION"];

#[derive(Serialize, Deserialize)]
struct RequestRow {
    set: String,
    dims: Vec<usize>,
    checked: Vec<usize>,
    layout: String,
    dtype: String,
}

#[derive(Serialize, Deserialize)]
struct Request {
    seed: u64,
    ops: Vec<String>,
    /// `--variant`'s list by name (`auto` for the planner's choice); empty: none given.
    #[serde(default)]
    variants: Vec<String>,
    /// A `--tuning-in` table's text, to plan with.
    #[serde(default)]
    tuning_in: Option<String>,
    rows: Vec<RequestRow>,
}

#[derive(Serialize, Deserialize)]
struct Response {
    /// Why the emulated driver could not be used, if it could not.
    unavailable: Option<String>,
    records: Vec<CheckRecord>,
}

/// Where the check can run at all: why not, if it cannot.
pub fn unavailable() -> Option<String> {
    if let Some(reason) = cuda_batchnorm::ptx_unavailable() {
        return Some(format!("built without PTX: {reason}"));
    }
    if driver::library().is_none() {
        return Some("the emulated driver is built on Linux only".into());
    }
    None
}

/// Checks `rows` x `ops` on the emulated kernels, each at [`nogpu::emulated_dims`], by
/// every family of `variants` (forced through `functional::set_tuning` in the child, as
/// on a GPU), with the `tuning_in` table's text when given.
pub fn check(
    rows: &[Row],
    ops: &[Op],
    variants: &[Option<Variant>],
    tuning_in: Option<&str>,
    seed: u64,
) -> Outcome {
    if let Some(why) = unavailable() {
        return Outcome::Unavailable(why);
    }
    let request = Request {
        seed,
        ops: ops.iter().map(|o| o.name().to_string()).collect(),
        variants: variants
            .iter()
            .map(|&v| tuning::choice_name(v).to_string())
            .collect(),
        tuning_in: tuning_in.map(str::to_string),
        rows: rows
            .iter()
            .map(|r| RequestRow {
                set: r.set.clone(),
                dims: r.dims.clone(),
                checked: nogpu::emulated_dims(r),
                layout: r.layout.name().into(),
                dtype: r.dtype.name().into(),
            })
            .collect(),
    };
    let request = match serde_json::to_vec(&request) {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("cannot write the request: {e}")),
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return Outcome::Unavailable(format!("cannot find bnbench's own path: {e}")),
    };
    let mut cmd = Command::new(&exe);
    cmd.arg(CHILD_FLAG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for knob in DRIVER_KNOBS {
        cmd.env_remove(knob);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Unavailable(format!("cannot start {}: {e}", exe.display()));
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A child that died early shows in its status below.
        let _ = stdin.write_all(&request);
    }
    let out = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => return Outcome::Failed(format!("waiting for the emulated run: {e}")),
    };
    match serde_json::from_slice::<Response>(&out.stdout) {
        Ok(r) if out.status.success() => match r.unavailable {
            Some(why) => Outcome::Unavailable(why),
            None => Outcome::Checked(r.records),
        },
        _ => Outcome::Failed(format!(
            "the emulated run ended without a result ({})",
            out.status
        )),
    }
}

/// The child: reads the request on stdin, writes the response on stdout. Returns the
/// exit status (0 whenever it could answer; the answer says how the checks went).
pub fn child_main() -> i32 {
    let mut text = String::new();
    let response = match std::io::stdin().read_to_string(&mut text) {
        Err(e) => Err(format!("cannot read the request: {e}")),
        Ok(_) => serde_json::from_str::<Request>(&text)
            .map_err(|e| format!("bad request: {e}"))
            .and_then(|r| run(&r)),
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bnbench {CHILD_FLAG}: {e}");
            return 2;
        }
    };
    match serde_json::to_string(&response) {
        Ok(t) => {
            let mut out = std::io::stdout().lock();
            if out
                .write_all(t.as_bytes())
                .and_then(|()| out.flush())
                .is_ok()
            {
                0
            } else {
                2
            }
        }
        Err(e) => {
            eprintln!("bnbench {CHILD_FLAG}: {e}");
            2
        }
    }
}

fn unavailable_response(why: String) -> Response {
    Response {
        unavailable: Some(why),
        records: Vec::new(),
    }
}

fn run(req: &Request) -> Result<Response, String> {
    if let Err(e) = driver::preload() {
        return Ok(unavailable_response(e));
    }
    // The SyncBatchNorm ops' communicator, before cudarc looks for libnccl; where it
    // cannot be loaded those ops say so (n/a), the others are checked all the same.
    if req
        .ops
        .iter()
        .any(|o| Op::parse(o).is_some_and(Op::is_sync))
    {
        if let Err(e) = cuda_batchnorm_emu::nccl::preload() {
            eprintln!("bnbench {CHILD_FLAG}: the emulated NCCL: {e}");
        }
    }
    let mut g = match gpu::open(0, false) {
        Ok(g) => g,
        Err(e) => return Ok(unavailable_response(format!("the emulated driver: {e}"))),
    };
    if g.summary.name != driver::DEVICE_NAME {
        return Ok(unavailable_response(format!(
            "the driver loaded is not the emulated one (device `{}`)",
            g.summary.name
        )));
    }
    let ops: Vec<Op> = req
        .ops
        .iter()
        .map(|o| Op::parse(o).ok_or_else(|| format!("unknown op `{o}`")))
        .collect::<Result<_, _>>()?;
    let variants: Vec<Option<Variant>> = req
        .variants
        .iter()
        .map(|v| match v.as_str() {
            tuning::AUTO => Ok(None),
            v => Variant::parse(v)
                .map(Some)
                .ok_or_else(|| format!("unknown variant `{v}`")),
        })
        .collect::<Result<_, _>>()?;
    let with_variant = !variants.is_empty();
    let choices = if with_variant { variants } else { vec![None] };
    if let Some(text) = &req.tuning_in {
        let t = tuning::parse(text).map_err(|e| format!("the tuning table: {e}"))?;
        g.use_table(t.planner)?;
    }
    let cfg = gpu::RunConfig {
        warmup: 0,
        reps: 0,
        seed: req.seed,
        check: true,
        timed: false,
    };
    let mut records = Vec::new();
    for (i, r) in req.rows.iter().enumerate() {
        let layout =
            parse_layout(&r.layout).ok_or_else(|| format!("unknown layout `{}`", r.layout))?;
        let dtype = DType::parse(&r.dtype).ok_or_else(|| format!("unknown dtype `{}`", r.dtype))?;
        let row = Row {
            set: r.set.clone(),
            dims: r.dims.clone(),
            layout,
            dtype,
        };
        let checked = Row {
            dims: r.checked.clone(),
            ..row.clone()
        };
        eprintln!(
            "[{}/{}] emulated {} at {}",
            i + 1,
            req.rows.len(),
            row.label(),
            dims_label(&r.checked)
        );
        let tol = check::tolerance(dtype);
        for res in g.run_row(&checked, &ops, &choices, &cfg, &mut |_, _| {}) {
            let mut rec = match (&res.unavailable, &res.error, &res.check) {
                (Some(why), _, _) => {
                    CheckRecord::unavailable(EMULATED, &row, &r.checked, res.op, why, tol)
                }
                (None, Some(e), _) => {
                    CheckRecord::new(EMULATED, &row, &r.checked, res.op, Err(e.as_str()), tol)
                }
                (None, None, Some(c)) => {
                    CheckRecord::new(EMULATED, &row, &r.checked, res.op, Ok(c), tol)
                }
                (None, None, None) => {
                    CheckRecord::new(EMULATED, &row, &r.checked, res.op, Err("not checked"), tol)
                }
            };
            if with_variant {
                rec.variant = Some(tuning::choice_name(res.variant).into());
            }
            records.push(rec);
        }
    }
    Ok(Response {
        unavailable: None,
        records,
    })
}
