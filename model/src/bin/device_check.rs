//! kubetune-device-check: does the model compute on a device what it computes in f32 on the CPU?
//!
//! On a generated tiny model it compares, against the f32 CPU reference:
//! - the logits of a forward with a LoRA adapter;
//! - one training step's loss and every adapter gradient, with a dense and an NF4 base;
//! - LoRA dropout's mask, drawn on the device, against the host's (they must be equal).
//!
//! The candidate runs on `--device` in that device's base dtype, bf16 on a GPU; on the CPU it
//! runs in bf16 too, so `--device cpu` exercises the GPU's code path without a GPU. It prints one
//! JSON object and exits 1 when a figure is past its bound. `e2e/gpu/check.sh` runs it.
//!
//! With `--profile` it times the pieces of one decoder layer's forward and backward instead
//! ([`kubetune_model::profile`]), on the shape its flags give (check.sh's large one by default).

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use kubetune_model::checkpointing::LossBatch;
use kubetune_model::tiny::{write_tiny_model, TinySpec};
use kubetune_model::{load_model, ActiveAdapter, BaseFormat, CausalLm, DeviceChoice, LoadOptions, LoraAdapter};
use kubetune_model::{LoraConfig, TargetModule};
use rand::{Rng, SeedableRng};

/// bf16 keeps 8 mantissa bits (about 4e-3 per value): relative errors of whole tensors, after
/// a two-layer forward or backward, stay well under these.
const LOGITS_BOUND: f64 = 0.03;
const LOSS_BOUND: f64 = 0.01;
const GRADIENT_BOUND: f64 = 0.05;

#[derive(Parser)]
struct Args {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = kubetune_model::device::parse_flag)]
    device: DeviceChoice,
    /// Time the pieces of one decoder layer instead of checking correctness.
    #[arg(long)]
    profile: bool,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    seq: usize,
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    #[arg(long, default_value_t = 5632)]
    intermediate: usize,
    #[arg(long, default_value_t = 16)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 16384)]
    vocab: usize,
    /// Timed runs of each piece (after two unmeasured ones).
    #[arg(long, default_value_t = 20)]
    reps: usize,
}

impl Args {
    /// The profiled shape: LoRA r=16 and 256 head rows, as check.sh's training runs.
    fn shape(&self) -> kubetune_model::profile::ProfileShape {
        kubetune_model::profile::ProfileShape {
            batch: self.batch,
            seq: self.seq,
            hidden: self.hidden,
            intermediate: self.intermediate,
            heads: self.heads,
            kv_heads: self.kv_heads,
            vocab: self.vocab,
            rank: 16,
            head_rows: 256,
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let report = if args.profile { profile(&args) } else { run(args.device) };
    match report {
        Ok(report) => {
            println!("{report}");
            // A profile only measures; a correctness report fails when a figure is past its bound.
            if report.get("pass").is_some_and(|pass| pass != true) {
                std::process::ExitCode::FAILURE
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn profile(args: &Args) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let (device, _) = kubetune_model::device::open(args.device)?;
    let shape = args.shape();
    let pieces = kubetune_model::profile::layer_pieces(&device, &shape, args.reps)?;
    let ms: serde_json::Map<String, serde_json::Value> = pieces
        .into_iter()
        .map(|(name, ms)| (name.to_string(), ms.into()))
        .collect();
    Ok(serde_json::json!({
        "device": kubetune_model::device::describe(&device),
        "shape": format!("{shape:?}"),
        "reps": args.reps,
        "ms": ms,
    }))
}

fn run(choice: DeviceChoice) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let (device, _) = kubetune_model::device::open(choice)?;
    let dir = std::env::temp_dir().join(format!("kubetune-device-check-{}", std::process::id()));
    write_tiny_model(&dir, &TinySpec::default())?;
    let mut report = serde_json::json!({
        "device": kubetune_model::device::describe(&device),
        "dtype": "bf16",
        "bounds": {"logits": LOGITS_BOUND, "loss": LOSS_BOUND, "gradients": GRADIENT_BOUND},
    });
    let mut pass = true;
    for base in [BaseFormat::Dense, BaseFormat::Nf4] {
        let reference = load_model(&dir, &LoadOptions::on(Device::Cpu, base))?.1;
        let options = LoadOptions {
            dtype: DType::BF16,
            ..LoadOptions::on(device.clone(), base)
        };
        let candidate = load_model(&dir, &options)?.1;
        let figures = compare(&reference, &candidate)?;
        let within = |key: &str, bound: f64| figures[key].as_f64().is_some_and(|v| v < bound);
        pass &= within("logits_rel_err", LOGITS_BOUND)
            && within("loss_rel_err", LOSS_BOUND)
            && within("gradient_rel_err_max", GRADIENT_BOUND);
        report[format!("{base:?}").to_lowercase()] = figures;
    }
    std::fs::remove_dir_all(&dir).ok();
    // LoRA dropout's masks: drawn on the device by our kernel, they must equal the host's.
    let mismatch = kubetune_model::lora::dropout_mask_mismatch(&device)?;
    report["dropout_mask_mismatch"] = mismatch.into();
    pass &= mismatch == 0.0;
    report["pass"] = pass.into();
    Ok(report)
}

/// The same adapter (seeded, with non-zero B) for a model, on its device.
fn adapter(model: &CausalLm) -> Result<(LoraAdapter, Vec<kubetune_model::lora::NamedVar>), Box<dyn std::error::Error>> {
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: TargetModule::ALL.to_vec(),
    };
    let (adapter, vars) = LoraAdapter::init_trainable(model.config(), lora, 7, model.device())?;
    for (i, v) in vars.iter().enumerate() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
        let values: Vec<f32> = (0..v.var.elem_count()).map(|_| rng.random_range(-0.1..0.1)).collect();
        v.var.set(&Tensor::from_vec(values, v.var.shape(), model.device())?)?;
    }
    Ok((adapter, vars))
}

fn compare(reference: &CausalLm, candidate: &CausalLm) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let vocab = reference.config().vocab_size as u32;
    let (batch, seq) = (2, 48);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| (i as u32 * 37 + 11) % (vocab - 8) + 7)
        .collect();
    let targets: Vec<u32> = ids.iter().skip(1).chain([&7]).copied().collect();
    let weights: Vec<f32> = (0..batch * seq).map(|i| if i % seq < 4 { 0.0 } else { 1.0 }).collect();
    let step = |model: &CausalLm| -> Result<(Tensor, f64, Vec<Tensor>), Box<dyn std::error::Error>> {
        let dev = model.device();
        let (adapter, vars) = adapter(model)?;
        let active = ActiveAdapter {
            adapter: &adapter,
            dropout_seed: None,
            first_row: 0,
        };
        let input = Tensor::from_vec(ids.clone(), (batch, seq), dev)?;
        let logits = model
            .forward(&input, 0, None, Some(&active))?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let targets = Tensor::from_vec(targets.clone(), batch * seq, dev)?;
        let weights = Tensor::from_vec(weights.clone(), batch * seq, dev)?;
        let loss_batch = LossBatch {
            input_ids: &input,
            targets: &targets,
            weights: &weights,
        };
        let (loss, grads) = model.loss_backward(&loss_batch, &active, 1.0, 64)?;
        let grads = vars
            .iter()
            .map(|v| {
                let g = grads
                    .get(v.var.as_tensor())
                    .ok_or_else(|| format!("no gradient for {}", v.name))?;
                Ok(g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
            })
            .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
        Ok((logits, loss, grads))
    };
    let (ref_logits, ref_loss, ref_grads) = step(reference)?;
    let (logits, loss, grads) = step(candidate)?;
    let mut worst = 0f64;
    for (g, r) in grads.iter().zip(&ref_grads) {
        worst = worst.max(relative_error(g, r)?);
    }
    let agree = logits
        .argmax(2)?
        .eq(&ref_logits.argmax(2)?)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(serde_json::json!({
        "logits_rel_err": relative_error(&logits, &ref_logits)?,
        "greedy_agreement": agree,
        "loss_reference": ref_loss,
        "loss": loss,
        "loss_rel_err": (loss - ref_loss).abs() / ref_loss.abs(),
        "gradients": grads.len(),
        "gradient_rel_err_max": worst,
    }))
}

/// ‖a − b‖ / ‖b‖.
fn relative_error(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let norm = |t: &Tensor| -> candle_core::Result<f64> { Ok((t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).sqrt()) };
    Ok(norm(&(a - b)?)? / norm(b)?)
}
