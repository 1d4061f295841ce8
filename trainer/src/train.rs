//! The training loop: micro-batches with token-weighted loss, gradient accumulation, clipping,
//! AdamW, evaluation, checkpoints and resume.

use crate::checkpoint::{self, LossPoint, TrainerState};
use crate::config::{Method, TrainConfig};
use crate::data::batch::{batches, epoch_order, PrepareStats};
use crate::data::tokenize::{Example, TextTokenizer};
use crate::error::{Result, TrainError};
use crate::evaluate::Judge;
use crate::io::local_path;
use crate::metrics::Metrics;
use crate::optim::{clip_grad_norm, learning_rate, AdamW};
use crate::prepare::prepare;
use candle_core::{DType, Device, Tensor};
use kubetune_model::checkpointing::{CheckpointedStep, LossBatch};
use kubetune_model::lora::{mix, NamedVar};
use kubetune_model::{load_model, peft, ActiveAdapter, BaseFormat, CausalLm, LoadOptions, LoraAdapter};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How to run, as opposed to what to train (that is [`TrainConfig`]).
#[derive(Clone)]
pub struct RunOptions {
    /// Continue from the newest checkpoint in the output directory, if there is one.
    pub resume: bool,
    /// Stop (after checkpointing) once this many steps are done, as a preempted pod would;
    /// a later run with `resume` continues.
    pub stop_after_steps: Option<u64>,
    pub metrics: Option<Arc<Metrics>>,
    pub device: Device,
    /// Set from outside (SIGTERM, preemption): the run checkpoints after the current step and
    /// stops, to be resumed later.
    pub stop: Option<Arc<AtomicBool>>,
    /// Called with each checkpoint directory once it is complete on disk (job mode uploads it).
    pub on_checkpoint: Option<CheckpointHook>,
    /// Follows the loop step by step (the binary's progress bar on a terminal).
    pub progress: Option<Arc<dyn ProgressObserver>>,
}

/// Receives `(checkpoint directory, step)`; an error fails the run.
pub type CheckpointHook = Arc<dyn Fn(&Path, u64) -> Result<()> + Send + Sync>;

/// Follows the training loop, on its thread: keep it quick, it runs between steps.
pub trait ProgressObserver: Send + Sync {
    /// The loop starts at `step` (past 0 when resumed) of `total_steps`, once the data and
    /// model are ready: step times are measured from here.
    fn start(&self, step: u64, total_steps: u64);
    /// An optimizer step is done.
    fn step(&self, progress: &StepProgress);
}

/// What one optimizer step did; the same values as the `train` log line and the gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress {
    /// Steps done, this one included.
    pub step: u64,
    pub total_steps: u64,
    /// Mean loss per trained token of this step.
    pub loss: f64,
    /// Since this run (not the job) started.
    pub tokens_per_second: f64,
    pub epoch: f64,
    pub learning_rate: f64,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            resume: false,
            stop_after_steps: None,
            metrics: None,
            device: Device::Cpu,
            stop: None,
            on_checkpoint: None,
            progress: None,
        }
    }
}

/// training_metrics.json.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainingMetrics {
    pub steps: u64,
    pub total_steps: u64,
    pub completed: bool,
    pub epochs: f64,
    pub final_train_loss: Option<f64>,
    pub best_train_loss: Option<f64>,
    pub initial_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub train_tokens: u64,
    pub duration_secs: f64,
    pub tokens_per_second: f64,
    pub train_sequences: usize,
    pub validation_sequences: usize,
    pub skipped_invalid: usize,
    pub preparation: PrepareStats,
    pub resumed_from_step: Option<u64>,
    pub train_history: Vec<LossPoint>,
    pub eval_history: Vec<LossPoint>,
    /// The base model and the adapter on the held-out data, when the config asks for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<kubetune_crds::EvaluationResult>,
}

pub const METRICS_FILE: &str = "training_metrics.json";

/// Trains an adapter as `config` says and writes it, with training_metrics.json, to the output
/// directory. Data and model are checked before the first step.
pub fn run(config: &TrainConfig, options: &RunOptions) -> Result<TrainingMetrics> {
    // On a rayon worker, so the many parallel ops of a step do not each put this thread to
    // sleep and wake it again (see kubetune_model::threads::in_pool).
    kubetune_model::threads::in_pool(|| run_in_pool(config, options))
}

fn run_in_pool(config: &TrainConfig, options: &RunOptions) -> Result<TrainingMetrics> {
    let started = Instant::now();
    let t = &config.training;
    // A GGUF file is trained on through its HF-layout import (made once, beside the file).
    let model_dir = kubetune_model::gguf::model_dir(&local_path(&config.model, "model")?)?;
    let output = local_path(&config.output, "output")?;
    let base = match config.method {
        Method::Lora => BaseFormat::Dense,
        Method::Qlora => BaseFormat::Nf4,
    };
    let (model_config, model) = load_model(&model_dir, &LoadOptions::on(options.device.clone(), base))?;
    let tokenizer = TextTokenizer::load(&model_dir, model_config.eos_token_ids().first().copied())?;
    let data = prepare(config, &tokenizer)?;
    tracing::info!(
        train_sequences = data.train.len(),
        validation_sequences = data.validation.len(),
        truncated = data.stats.truncated,
        dropped_no_target = data.stats.dropped_no_target,
        skipped_invalid = data.skipped_invalid,
        "dataset ready"
    );

    let (adapter, vars) = LoraAdapter::init_trainable(&model_config, config.lora.to_lora(), t.seed, &options.device)?;
    let mut optimizer = AdamW::new(&vars, t.weight_decay)?;
    let batches_per_epoch = data.train.len().div_ceil(t.batch_size) as u64;
    let accum = t.gradient_accumulation_steps as u64;
    let total_steps = match t.max_steps {
        Some(s) if s > 0 => s,
        _ => u64::from(t.epochs.unwrap_or(1)) * batches_per_epoch.div_ceil(accum),
    };
    let base_name = config.base_model_name.clone().unwrap_or_else(|| config.model.clone());
    let fingerprint = fingerprint(config)?;

    let mut state = TrainerState {
        step: 0,
        micro_batches: 0,
        tokens: 0,
        elapsed_secs: 0.0,
        train_history: Vec::new(),
        eval_history: Vec::new(),
        fingerprint: fingerprint.clone(),
    };
    let mut resumed_from = None;
    if options.resume {
        if let Some((_, dir)) = checkpoint::list(&output)?.pop() {
            state = restore(&dir, &model_config, config, &vars, &mut optimizer, &options.device)?;
            if state.fingerprint != fingerprint {
                return Err(TrainError::Checkpoint {
                    path: dir,
                    message: "the training settings differ from those the checkpoint was made with".into(),
                });
            }
            resumed_from = Some(state.step);
            if let Some(m) = &options.metrics {
                m.resumed_from_step.set(state.step as f64);
            }
            tracing::info!(step = state.step, checkpoint = %dir.display(), "resuming");
        } else {
            tracing::info!(output = %output.display(), "no checkpoint to resume from; starting at step 0");
        }
    }

    let eval = |step: u64| -> Result<Option<f64>> {
        if data.validation.is_empty() {
            return Ok(None);
        }
        let loss = evaluate(
            &model,
            &adapter,
            &data.validation,
            t.batch_size,
            tokenizer.eos,
            &options.device,
        )?;
        tracing::info!(step, eval_loss = loss, "eval");
        if let Some(m) = &options.metrics {
            m.eval_loss.set(loss);
        }
        Ok(Some(loss))
    };
    let initial_eval = if state.step == 0 {
        eval(0)?
    } else {
        state.eval_history.first().map(|p| p.loss)
    };
    if state.step == 0 {
        if let Some(loss) = initial_eval {
            state.eval_history.push(LossPoint { step: 0, loss });
        }
    }
    if let Some(m) = &options.metrics {
        m.total_steps.set(total_steps as f64);
        m.step.set(state.step as f64);
    }

    if let Some(p) = &options.progress {
        p.start(state.step, total_steps);
    }
    let segment_start = Instant::now();
    let tokens_at_start = state.tokens;
    let elapsed_before = state.elapsed_secs;
    let mut stopped_early = false;
    let mut timer = crate::timing::StepTimer::from_env(&options.device);
    let mut steps_timed = 0;
    while state.step < total_steps {
        let step = state.step;
        let micro: Vec<Vec<&Example>> = (0..accum)
            .map(|k| {
                micro_batch(
                    &data.train,
                    state.micro_batches + k,
                    batches_per_epoch,
                    t.batch_size,
                    t.seed,
                )
            })
            .collect();
        let step_targets: usize = micro.iter().flatten().map(|e| e.trained_tokens()).sum();
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0.0;
        for (k, batch) in micro.iter().enumerate() {
            let g = state.micro_batches + k as u64;
            let active = ActiveAdapter {
                adapter: &adapter,
                dropout_seed: Some(mix(t.seed, g)),
                first_row: 0,
            };
            // Dividing by the step's target count makes accumulation equal to one big batch.
            let scale = 1.0 / step_targets.max(1) as f64;
            let targets = LossTargets::of(batch, tokenizer.eos, &options.device)?;
            timer.mark("batch");
            if t.gradient_checkpointing {
                let step = CheckpointedStep {
                    adapter: active,
                    loss_scale: scale,
                    head_rows: HEAD_ROWS,
                    recompute_sequences: targets.recompute_sequences()?,
                };
                let out = model.loss_backward_checkpointed(&targets.as_batch(), &step)?;
                for store in &out.stores {
                    accumulate(&mut grads, store, &vars)?;
                }
                loss_sum += out.loss_sum;
            } else {
                let (sum, store) = model.loss_backward(&targets.as_batch(), &active, scale, HEAD_ROWS)?;
                accumulate(&mut grads, &store, &vars)?;
                loss_sum += sum;
            }
            state.tokens += batch.iter().map(|e| e.ids.len() as u64).sum::<u64>();
            timer.mark("forward_backward");
        }
        let loss = loss_sum / step_targets.max(1) as f64;
        if !loss.is_finite() {
            return Err(TrainError::Diverged { step: step + 1, loss });
        }
        let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
        timer.mark("clip");
        if !grad_norm.is_finite() {
            return Err(TrainError::Diverged {
                step: step + 1,
                loss: grad_norm,
            });
        }
        let lr = learning_rate(t.learning_rate, t.scheduler, t.warmup_steps, step, total_steps);
        optimizer.step(&grads, lr)?;
        timer.mark("optimizer");
        steps_timed += 1;
        state.step += 1;
        state.micro_batches += accum;
        state.train_history.push(LossPoint { step: state.step, loss });

        let secs = segment_start.elapsed().as_secs_f64();
        let tps = (state.tokens - tokens_at_start) as f64 / secs.max(1e-9);
        let epoch = state.micro_batches as f64 / batches_per_epoch as f64;
        if let Some(m) = &options.metrics {
            m.train_loss.set(loss);
            m.step.set(state.step as f64);
            m.epoch.set(epoch);
            m.tokens_per_second.set(tps);
            m.learning_rate.set(lr);
            m.grad_norm.set(grad_norm);
        }
        if let Some(p) = &options.progress {
            p.step(&StepProgress {
                step: state.step,
                total_steps,
                loss,
                tokens_per_second: tps,
                epoch,
                learning_rate: lr,
            });
        }
        if t.logging_steps > 0 && (state.step.is_multiple_of(t.logging_steps) || state.step == 1) {
            tracing::info!(
                step = state.step,
                total_steps,
                loss,
                lr,
                grad_norm,
                epoch,
                tokens_per_second = tps,
                "train"
            );
            timer.report(state.step, std::mem::take(&mut steps_timed));
        }
        let last = state.step == total_steps;
        if t.eval_steps > 0 && state.step.is_multiple_of(t.eval_steps) && !last {
            if let Some(l) = eval(state.step)? {
                state.eval_history.push(LossPoint {
                    step: state.step,
                    loss: l,
                });
            }
        }
        let stop_requested = options.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        let stop_now = (options.stop_after_steps.is_some_and(|s| state.step >= s) || stop_requested) && !last;
        if (t.save_steps > 0 && state.step.is_multiple_of(t.save_steps) && !last) || stop_now {
            state.elapsed_secs = elapsed_before + segment_start.elapsed().as_secs_f64();
            let dir = checkpoint::save(&output, &adapter, &base_name, &optimizer.state(), &state)?;
            tracing::info!(step = state.step, checkpoint = %dir.display(), "checkpoint saved");
            if let Some(hook) = &options.on_checkpoint {
                hook(&dir, state.step)?;
            }
        }
        if stop_now {
            stopped_early = true;
            break;
        }
    }

    if !stopped_early {
        if let Some(l) = eval(state.step)? {
            state.eval_history.push(LossPoint {
                step: state.step,
                loss: l,
            });
        }
        peft::save(&output, &adapter, &base_name)?;
    }
    let evaluation = if stopped_early {
        None
    } else {
        judge_if_asked(config, options, &model, &model_config, &adapter, &data, &tokenizer)?
    };
    let segment_secs = segment_start.elapsed().as_secs_f64();
    let duration = elapsed_before + segment_secs.max(started.elapsed().as_secs_f64().min(segment_secs));
    let metrics = TrainingMetrics {
        steps: state.step,
        total_steps,
        completed: !stopped_early,
        epochs: state.micro_batches as f64 / batches_per_epoch as f64,
        final_train_loss: state.train_history.last().map(|p| p.loss),
        best_train_loss: state.train_history.iter().map(|p| p.loss).reduce(f64::min),
        initial_eval_loss: initial_eval,
        final_eval_loss: if stopped_early {
            None
        } else {
            state.eval_history.last().map(|p| p.loss)
        },
        best_eval_loss: state.eval_history.iter().map(|p| p.loss).reduce(f64::min),
        train_tokens: state.tokens,
        duration_secs: duration,
        tokens_per_second: (state.tokens - tokens_at_start) as f64 / segment_secs.max(1e-9),
        train_sequences: data.train.len(),
        validation_sequences: data.validation.len(),
        skipped_invalid: data.skipped_invalid,
        preparation: data.stats.clone(),
        resumed_from_step: resumed_from,
        train_history: state.train_history.clone(),
        eval_history: state.eval_history.clone(),
        evaluation,
    };
    write_metrics(&output, &metrics)?;
    Ok(metrics)
}

/// The adapter judged against the base model, when the config asks for it (see
/// [`crate::evaluate`]); after the adapter is saved, so a failure here loses no training.
fn judge_if_asked(
    config: &TrainConfig,
    options: &RunOptions,
    model: &CausalLm,
    model_config: &kubetune_model::Config,
    adapter: &LoraAdapter,
    data: &crate::prepare::Prepared,
    tokenizer: &TextTokenizer,
) -> Result<Option<kubetune_crds::EvaluationResult>> {
    let Some(settings) = &config.evaluation else {
        return Ok(None);
    };
    let stop_tokens = [model_config.eos_token_ids(), vec![tokenizer.eos]].concat();
    let judge = Judge {
        model,
        adapter,
        held_out: &data.validation,
        tokenizer,
        stop_tokens: &stop_tokens,
        batch_size: config.training.batch_size,
        device: &options.device,
        metrics: options.metrics.as_deref(),
    };
    crate::evaluate::judge(&judge, settings).map(Some)
}

/// The sequences of global micro-batch `g`: epoch `g / per_epoch` in that epoch's seeded order.
fn micro_batch(train: &[Example], g: u64, per_epoch: u64, batch_size: usize, seed: u64) -> Vec<&Example> {
    let epoch = g / per_epoch;
    let index = (g % per_epoch) as usize;
    let order = epoch_order(train.len(), seed, epoch);
    batches(&order, batch_size)
        .get(index)
        .map(|b| b.iter().map(|&i| &train[i]).collect())
        .unwrap_or_default()
}

/// Rows of logits computed at once (with the CPU's hand-written step, by all threads
/// together): 256 rows of a vocabulary of 32k are 32 MiB of f32, about what one recomputed
/// layer holds.
const HEAD_ROWS: usize = 256;

/// Tokens whose layer is recomputed at once under gradient checkpointing through candle's
/// graph (CUDA). Whole sequences go together up to this many: fewer hold fewer activations,
/// but matmuls of under ~512 rows ran slower (bench, 4 x 256 tokens: one sequence at a time
/// 586 tok/s and 291 MiB peak RSS, two 652 tok/s and 310 MiB, all four 671 tok/s and 366
/// MiB). The CPU's hand-written step recomputes the whole batch, whose tape of a layer is a
/// fraction of what the graph held.
const RECOMPUTE_TOKENS: usize = 512;

/// A micro-batch as tensors. Sequences are right-padded, so padding never influences earlier
/// positions under the causal mask. Position i of a sequence predicts token i + 1; its weight
/// is 1 when that token is trained, else 0 (prompts, padding, the last position).
struct LossTargets {
    input: Tensor,
    /// (batch * len) next-token ids.
    targets: Tensor,
    /// (batch * len) loss weights.
    weights: Tensor,
    count: usize,
}

impl LossTargets {
    /// Sequences per recomputed part, for [`RECOMPUTE_TOKENS`].
    fn recompute_sequences(&self) -> Result<usize> {
        let (_, len) = self.input.dims2()?;
        Ok((RECOMPUTE_TOKENS / len.max(1)).max(1))
    }

    fn of(batch: &[&Example], pad: u32, device: &Device) -> Result<Self> {
        let len = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let rows = batch.len() * len;
        let (mut ids, mut targets, mut weights) = (
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
        );
        let mut count = 0;
        for e in batch {
            for i in 0..len {
                ids.push(e.ids.get(i).copied().unwrap_or(pad));
                let trained = e.trained.get(i + 1).copied().unwrap_or(false);
                targets.push(e.ids.get(i + 1).copied().unwrap_or(pad));
                weights.push(if trained { 1f32 } else { 0f32 });
                count += trained as usize;
            }
        }
        Ok(Self {
            input: Tensor::from_vec(ids, (batch.len(), len), device)?,
            targets: Tensor::from_vec(targets, rows, device)?,
            weights: Tensor::from_vec(weights, rows, device)?,
            count,
        })
    }

    fn as_batch(&self) -> LossBatch<'_> {
        LossBatch {
            input_ids: &self.input,
            targets: &self.targets,
            weights: &self.weights,
        }
    }

    /// Sum of the token losses of the trained targets, through one recorded forward.
    fn loss_sum(&self, model: &CausalLm, adapter: &ActiveAdapter) -> Result<Tensor> {
        Ok(model.loss_sum(&self.as_batch(), adapter, HEAD_ROWS)?)
    }
}

/// Mean loss per trained token over `examples`, without dropout.
pub fn evaluate(
    model: &CausalLm,
    adapter: &LoraAdapter,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
    device: &Device,
) -> Result<f64> {
    // Detached, the forward records no graph and frees each activation once used.
    let detached = adapter.detached();
    let active = ActiveAdapter {
        adapter: &detached,
        dropout_seed: None,
        first_row: 0,
    };
    let (mut sum, mut count) = (0.0, 0);
    for chunk in examples.chunks(batch_size) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let targets = LossTargets::of(&refs, pad, device)?;
        sum += targets.loss_sum(model, &active)?.to_scalar::<f32>()? as f64;
        count += targets.count;
    }
    Ok(sum / count.max(1) as f64)
}

fn accumulate(
    grads: &mut BTreeMap<String, Tensor>,
    store: &candle_core::backprop::GradStore,
    vars: &[NamedVar],
) -> Result<()> {
    for v in vars {
        if let Some(g) = store.get(v.var.as_tensor()) {
            let g = g.detach();
            let sum = match grads.remove(&v.name) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(v.name.clone(), sum);
        }
    }
    Ok(())
}

fn restore(
    dir: &Path,
    model_config: &kubetune_model::Config,
    config: &TrainConfig,
    vars: &[NamedVar],
    optimizer: &mut AdamW,
    device: &Device,
) -> Result<TrainerState> {
    let loaded = checkpoint::load(dir, device)?;
    let bad = |message: String| TrainError::Checkpoint {
        path: dir.into(),
        message,
    };
    let adapter = LoraAdapter::from_peft_tensors(model_config, config.lora.to_lora(), loaded.adapter_tensors)
        .map_err(|e| bad(e.to_string()))?;
    let tensors = adapter.to_peft_tensors();
    for v in vars {
        let t = tensors
            .get(&v.name)
            .ok_or_else(|| bad(format!("adapter lacks {}", v.name)))?;
        v.var.set(&t.to_dtype(DType::F32)?)?;
    }
    optimizer.load_state(loaded.optimizer, loaded.state.step).map_err(bad)?;
    Ok(loaded.state)
}

/// The settings that change the loss curve; checkpoint/eval/logging cadence and the step
/// limit may differ between the interrupted and the resumed run.
fn fingerprint(config: &TrainConfig) -> Result<String> {
    let mut t = config.training.clone();
    // Recomputing activations changes the memory, not the curve (beyond float noise).
    t.gradient_checkpointing = false;
    t.save_steps = 0;
    t.eval_steps = 0;
    t.logging_steps = 0;
    // Identity, not location: a retried pod downloads the same model and data to another
    // path, and must still resume. The model by the name adapters record, the data by content.
    let content = |path: &str| -> Result<String> {
        let local = crate::io::local_path(path, "dataset")?;
        let bytes = std::fs::read(&local).map_err(TrainError::io(&local))?;
        Ok(kubetune_storage::Sha256Digest::of(&bytes).to_string())
    };
    let d = &config.dataset;
    let value = serde_json::json!({
        "model": config.base_model_name.as_ref().unwrap_or(&config.model), "method": config.method, "lora": config.lora, "training": t,
        "dataset": {
            "data": content(&d.path)?,
            "validation": d.validation_path.as_deref().map(content).transpose()?,
            "format": d.format, "validationSplit": d.validation_split, "skipInvalid": d.skip_invalid,
        },
    });
    serde_json::to_string(&value).map_err(|e| TrainError::Config {
        path: "fingerprint".into(),
        message: e.to_string(),
    })
}

fn write_metrics(output: &Path, metrics: &TrainingMetrics) -> Result<()> {
    std::fs::create_dir_all(output).map_err(TrainError::io(output))?;
    let path = output.join(METRICS_FILE);
    let json = serde_json::to_string_pretty(metrics).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&path, json).map_err(TrainError::io(&path))
}

/// Loads a model and its tokenizer for decoding with a trained adapter (tests, smoke checks).
pub fn tokenizer_for(model_dir: &Path, config: &kubetune_model::Config) -> Result<TextTokenizer> {
    TextTokenizer::load(model_dir, config.eos_token_ids().first().copied())
}
