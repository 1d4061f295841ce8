//! The memory of one training step on the path a GPU takes (candle's graph, base in bf16,
//! adapter in f32), measured on the CPU: what the graph holds is the same tensors on either
//! device, so the activation memory of the GPU path can be found and cut without a GPU.
//!
//! `cargo run --release -p kubetune-model --example step_memory -- MODEL_DIR [--batch 4]
//! [--seq 512] [--nf4] [--checkpointing] [--f32] [--dropout P]`
//!
//! Prints one JSON object: the bytes live before the step (the base, the adapter), and the
//! peak above them during one forward and backward, counted exactly by a counting allocator,
//! and the same peak as resident memory (Linux's high-water mark, reset before the step), which
//! is how `trainer/bench/bench.py peft-memory` measures PyTorch + PEFT on the same model.
//! `e2e/bench/step-memory.sh` runs both side by side. A measurement, not a test.

use candle_core::{DType, Device, Tensor};
use kubetune_model::checkpointing::{CheckpointedStep, LossBatch};
use kubetune_model::{load_model, ActiveAdapter, BaseFormat, LoadOptions, LoraAdapter, LoraConfig, TargetModule};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts the bytes held through the global allocator, and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is passed to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Tokens recomputed at once under checkpointing, as the trainer's `RECOMPUTE_TOKENS_GPU`:
/// this measures the GPU's path, where a layer is rebuilt for whole batches of this size.
const RECOMPUTE_TOKENS: usize = 8192;
/// Rows of the head computed at once, as the trainer's `HEAD_ROWS`.
const HEAD_ROWS: usize = 256;

struct Args {
    dir: String,
    batch: usize,
    seq: usize,
    nf4: bool,
    checkpointing: bool,
    dtype: DType,
    dropout: f64,
}

fn parse() -> Result<Args, String> {
    let usage = "usage: step_memory MODEL_DIR [--batch N] [--seq N] [--nf4] [--checkpointing] [--f32] [--dropout P]";
    let mut args = std::env::args().skip(1);
    let mut out = Args {
        dir: args.next().ok_or(usage)?,
        batch: 4,
        seq: 512,
        nf4: false,
        checkpointing: false,
        dtype: DType::BF16,
        dropout: 0.0,
    };
    while let Some(flag) = args.next() {
        let mut number = || -> Result<usize, String> {
            let value = args.next().ok_or(format!("{flag} needs a number"))?;
            value.parse().map_err(|_| format!("{flag}: {value:?} is not a number"))
        };
        match flag.as_str() {
            "--batch" => out.batch = number()?,
            "--seq" => out.seq = number()?,
            "--nf4" => out.nf4 = true,
            "--checkpointing" => out.checkpointing = true,
            "--f32" => out.dtype = DType::F32,
            "--dropout" => {
                let value = args.next().ok_or("--dropout needs a probability")?;
                out.dropout = value
                    .parse()
                    .map_err(|_| format!("--dropout: {value:?} is not a number"))?;
            }
            _ => return Err(format!("unknown argument {flag:?}; {usage}")),
        }
    }
    Ok(out)
}

/// Linux's resident high-water mark and current resident set, in bytes.
fn resident() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Sets the resident high-water mark to the current resident set ("5" to clear_refs).
fn reset_high_water_mark() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse()?;
    let base = if args.nf4 { BaseFormat::Nf4 } else { BaseFormat::Dense };
    let options = LoadOptions {
        dtype: args.dtype,
        ..LoadOptions::on(Device::Cpu, base)
    };
    let (config, model) = load_model(std::path::Path::new(&args.dir), &options)?;
    let lora = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: args.dropout,
        target_modules: TargetModule::ALL.to_vec(),
    };
    let (adapter, _vars) = LoraAdapter::init_trainable(&config, lora, 0, model.device())?;
    let rows = args.batch * args.seq;
    let vocab = config.vocab_size as u32;
    let ids: Vec<u32> = (0..rows as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let input = Tensor::from_vec(ids.clone(), (args.batch, args.seq), model.device())?;
    let targets = Tensor::from_vec(ids.iter().skip(1).chain([&0]).copied().collect(), rows, model.device())?;
    let weights = Tensor::ones(rows, DType::F32, model.device())?;
    let batch = LossBatch {
        input_ids: &input,
        targets: &targets,
        weights: &weights,
    };
    let active = ActiveAdapter {
        adapter: &adapter,
        dropout_seed: Some(7),
        first_row: 0,
    };

    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let (_, resident_before) = resident();
    reset_high_water_mark();
    let start = std::time::Instant::now();
    let loss = if args.checkpointing {
        let step = CheckpointedStep {
            adapter: active,
            loss_scale: 1.0 / rows as f64,
            head_rows: HEAD_ROWS,
            recompute_sequences: (RECOMPUTE_TOKENS / args.seq).max(1),
        };
        model.loss_backward_checkpointed(&batch, &step)?.loss_sum
    } else {
        model.loss_backward(&batch, &active, 1.0 / rows as f64, HEAD_ROWS)?.0
    };
    let seconds = start.elapsed().as_secs_f64();
    let peak = PEAK.load(Ordering::Relaxed);
    let (high_water, _) = resident();
    let mib = |bytes: usize| (bytes as f64 / (1 << 20) as f64 * 10.0).round() / 10.0;
    let report = serde_json::json!({
        "dtype": format!("{:?}", args.dtype).to_lowercase(),
        "base": if args.nf4 { "nf4" } else { "dense" },
        "checkpointing": args.checkpointing,
        "dropout": args.dropout,
        "tokens": rows,
        "loss_per_token": loss / rows as f64,
        "held_before_mib": mib(before),
        "step_peak_mib": mib(peak - before),
        "resident_before_mib": mib(resident_before),
        "resident_step_peak_mib": mib(high_water.saturating_sub(resident_before)),
        "seconds": (seconds * 100.0).round() / 100.0,
    });
    println!("{report}");
    Ok(())
}
