//! The training loop: micro-batches with token-weighted loss, gradient accumulation, clipping,
//! AdamW, evaluation, checkpoints and resume.

use crate::checkpoint::{self, LossPoint, TrainerState};
use crate::config::{DpoSettings, InitFrom, Method, TrainConfig, TrainingSettings};
use crate::data::batch::Pair;
use crate::data::batch::{batches, epoch_order, PrepareStats};
use crate::data::tokenize::{Example, TextTokenizer};
use crate::dpo::{self, DpoStats};
use crate::error::{Result, TrainError};
use crate::evaluate::Judge;
use crate::io::local_path;
use crate::metrics::Metrics;
use crate::optim::{clip_grad_norm, learning_rate, AdamW};
use crate::prepare::{prepare, Prepared};
use crate::timing::StepTimer;
use candle_core::{DType, Device, Tensor};
use kubetune_model::checkpointing::{CheckpointedStep, LossBatch};
use kubetune_model::lora::{mix, NamedVar};
use kubetune_model::{load_model, peft, ActiveAdapter, BaseFormat, CausalLm, LoadOptions, LoraAdapter};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
    /// Under `method: dpo`: the last step's and the held-out pairs' rewards (the losses above
    /// are then DPO losses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoMetrics>,
}

/// The DPO numbers of a finished run, as TRL names them (rewards/chosen, ...).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DpoMetrics {
    /// The last optimizer step's pairs.
    pub train: Option<DpoStats>,
    /// The held-out pairs after the last step (absent for a run stopped early).
    pub eval: Option<DpoStats>,
}

pub const METRICS_FILE: &str = "training_metrics.json";

/// Trains an adapter as `config` says and writes it, with training_metrics.json, to the output
/// directory. Data and model are checked before the first step.
pub fn run(config: &TrainConfig, options: &RunOptions) -> Result<TrainingMetrics> {
    // On a rayon worker, so the many parallel ops of a step do not each put this thread to
    // sleep and wake it again (see kubetune_model::threads::in_pool).
    kubetune_model::threads::in_pool(|| run_in_pool(config, options))
}

// The loop is split into its phases (resume, step, evaluate, checkpoint, finish) so that each
// can be tested on its own; `run_in_pool` only orders them.
fn run_in_pool(config: &TrainConfig, options: &RunOptions) -> Result<TrainingMetrics> {
    let started = Instant::now();
    let session = Session::open(config, options)?;
    let mut optimizer = AdamW::new(&session.vars, config.training.weight_decay)?;
    let (mut state, resumed_from) = resume(&session, &mut optimizer, fingerprint(config)?)?;
    let initial_eval = initial_eval(&session, &mut state)?;
    announce_start(&session, &state);
    let segment = Segment::start(&state);
    let (stopped_early, last_dpo) = train_loop(&session, &mut optimizer, &mut state, &segment)?;
    let run = RunSummary {
        started,
        segment: &segment,
        initial_eval,
        resumed_from,
        stopped_early,
        last_dpo,
    };
    finish(&session, state, &run)
}

/// What a run holds fixed once it starts: the loaded model, data and adapter, and what the
/// settings derive from them.
struct Session<'a> {
    config: &'a TrainConfig,
    options: &'a RunOptions,
    output: PathBuf,
    /// The name adapters and checkpoints record as their base model.
    base_name: String,
    model_config: kubetune_model::Config,
    model: CausalLm,
    tokenizer: TextTokenizer,
    data: Prepared,
    adapter: LoraAdapter,
    vars: Vec<NamedVar>,
    plan: Plan,
    /// Under `method: dpo`, the reference's (chosen, rejected) log-probs of each training and
    /// held-out pair, in the data's order. The base is frozen, so they are computed once here
    /// rather than by a forward in every step (TRL's `precompute_ref_log_probs`): each step
    /// then costs the policy's scoring forward and the backward's forward and backward only.
    /// With `initFrom` the reference is the starting adapter's policy, computed the same way
    /// before any update (see [`Session::reference_logps`]).
    reference: ReferenceLogps,
}

#[derive(Default)]
struct ReferenceLogps {
    train: Vec<(f64, f64)>,
    validation: Vec<(f64, f64)>,
}

impl<'a> Session<'a> {
    /// Loads the model (a GGUF file through its HF-layout import, made once beside the file),
    /// prepares the data and initialises the adapter.
    fn open(config: &'a TrainConfig, options: &'a RunOptions) -> Result<Self> {
        let t = &config.training;
        let model_dir = kubetune_model::gguf::model_dir(&local_path(&config.model, "model")?)?;
        let output = local_path(&config.output, "output")?;
        let base = if config.quantized_base() {
            BaseFormat::Nf4
        } else {
            BaseFormat::Dense
        };
        let (model_config, model) = load_model(&model_dir, &LoadOptions::on(options.device.clone(), base))?;
        let tokenizer = TextTokenizer::load(&model_dir, model_config.eos_token_ids().first().copied())?;
        tokenizer.check_fits(model_config.vocab_size)?;
        let data = prepare(config, &tokenizer)?;
        tracing::info!(
            train_sequences = data.train.len(),
            validation_sequences = data.validation.len(),
            truncated = data.stats.truncated,
            dropped_no_target = data.stats.dropped_no_target,
            skipped_invalid = data.skipped_invalid,
            "dataset ready"
        );
        let (adapter, vars) =
            LoraAdapter::init_trainable(&model_config, config.lora.to_lora(), t.seed, &options.device)?;
        if let Some(from) = &config.init_from {
            start_from(from, &config.lora.to_lora(), &model_config, &vars, &options.device)?;
        }
        let plan = Plan::of(t, data.train_units());
        let mut session = Self {
            config,
            options,
            output,
            base_name: config.base_model_name.clone().unwrap_or_else(|| config.model.clone()),
            model_config,
            model,
            tokenizer,
            data,
            adapter,
            vars,
            plan,
            reference: ReferenceLogps::default(),
        };
        if config.method == Method::Dpo {
            session.reference = session.reference_logps()?;
        }
        Ok(session)
    }

    /// The reference's log-probs of every pair (see [`Session::reference`]). Continuing from
    /// an adapter, the reference is that adapter (as TRL with a PEFT model whose adapter is
    /// loaded trainable: its reference is the model before training). Its log-probs are taken
    /// here, with the starting weights loaded and before any update, and stored per pair rather
    /// than kept as a frozen second copy of the adapter: the starting adapter never changes, so
    /// values computed once are exact, and no extra weights or forward per step are needed.
    /// A resumed pod computes them here too, before its checkpoint's weights are restored.
    fn reference_logps(&self) -> Result<ReferenceLogps> {
        let dpo = self.dpo_model();
        let from_adapter = self.config.init_from.is_some();
        let of = |pairs: &[Pair]| -> Result<Vec<(f64, f64)>> {
            let pairs: Vec<&Pair> = pairs.iter().collect();
            let mut out = Vec::with_capacity(pairs.len());
            for chunk in pairs.chunks(self.config.training.batch_size) {
                out.extend(if from_adapter {
                    dpo.adapter_logps(chunk)?
                } else {
                    dpo.reference_logps(chunk)?
                });
            }
            Ok(out)
        };
        let reference = ReferenceLogps {
            train: of(&self.data.train_pairs)?,
            validation: of(&self.data.validation_pairs)?,
        };
        tracing::info!(
            pairs = reference.train.len() + reference.validation.len(),
            "reference log-probs ready"
        );
        Ok(reference)
    }

    fn metrics(&self) -> Option<&Metrics> {
        self.options.metrics.as_deref()
    }

    fn dpo_model(&self) -> DpoModel<'_> {
        DpoModel {
            model: &self.model,
            adapter: &self.adapter,
            vars: &self.vars,
            settings: self.config.dpo.unwrap_or_default(),
            pad: self.tokenizer.eos,
            device: &self.options.device,
            gradient_checkpointing: self.config.training.gradient_checkpointing,
        }
    }
}

/// Loads the starting adapter's weights into the trainable `vars`, after checking that the
/// run's LoRA settings are the adapter's own (dropout aside, which only acts in training).
fn start_from(
    from: &InitFrom,
    lora: &kubetune_model::LoraConfig,
    model_config: &kubetune_model::Config,
    vars: &[NamedVar],
    device: &Device,
) -> Result<()> {
    let dir = local_path(&from.path, "initFrom.path")?;
    let (_, start) = peft::load(&dir, model_config, device)?;
    check_start_settings(lora, &start.config).map_err(|message| TrainError::Config {
        path: "initFrom".into(),
        message: format!("{message} ({})", from.reference.as_deref().unwrap_or(&from.path)),
    })?;
    let tensors = start.to_peft_tensors();
    for v in vars {
        let t = tensors.get(&v.name).ok_or_else(|| TrainError::Config {
            path: "initFrom".into(),
            message: format!("the starting adapter lacks {}", v.name),
        })?;
        v.var.set(&t.to_dtype(DType::F32)?)?;
    }
    tracing::info!(
        adapter = from.reference.as_deref().unwrap_or(&from.path),
        "starting from an existing adapter"
    );
    Ok(())
}

/// Err naming the first LoRA setting of the run that differs from the starting adapter's.
pub fn check_start_settings(
    run: &kubetune_model::LoraConfig,
    start: &kubetune_model::LoraConfig,
) -> std::result::Result<(), String> {
    let names = |m: &[kubetune_model::TargetModule]| m.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ");
    if run.r != start.r {
        return Err(format!(
            "lora.r: {} differs from the starting adapter's rank {}",
            run.r, start.r
        ));
    }
    if run.alpha != start.alpha {
        return Err(format!(
            "lora.alpha: {} differs from the starting adapter's {}",
            run.alpha, start.alpha
        ));
    }
    let (mut a, mut b) = (run.target_modules.clone(), start.target_modules.clone());
    a.sort();
    b.sort();
    if a != b {
        return Err(format!(
            "lora.targetModules: [{}] differ from the starting adapter's [{}]",
            names(&a),
            names(&b)
        ));
    }
    Ok(())
}

/// The step arithmetic the settings and the training set fix.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Plan {
    batches_per_epoch: u64,
    /// Micro-batches per optimizer step.
    accum: u64,
    total_steps: u64,
}

impl Plan {
    /// `max_steps` when set, else whole epochs, each rounded up to a full step.
    fn of(t: &TrainingSettings, train_sequences: usize) -> Self {
        let batches_per_epoch = train_sequences.div_ceil(t.batch_size) as u64;
        let accum = t.gradient_accumulation_steps as u64;
        let total_steps = match t.max_steps {
            Some(s) if s > 0 => s,
            _ => u64::from(t.epochs.unwrap_or(1)) * batches_per_epoch.div_ceil(accum),
        };
        Self {
            batches_per_epoch,
            accum,
            total_steps,
        }
    }

    /// Epochs done after `micro_batches` micro-batches, fractional within an epoch.
    fn epoch(&self, micro_batches: u64) -> f64 {
        micro_batches as f64 / self.batches_per_epoch as f64
    }
}

/// The state of a run that has done nothing yet.
fn fresh_state(fingerprint: String) -> TrainerState {
    TrainerState {
        step: 0,
        micro_batches: 0,
        tokens: 0,
        elapsed_secs: 0.0,
        train_history: Vec::new(),
        eval_history: Vec::new(),
        fingerprint,
    }
}

/// Where the loop starts: step 0, or, when asked to resume, the newest checkpoint in the
/// output directory (adapter, optimizer and state restored). A checkpoint made with settings
/// that change the loss curve is refused rather than continued into a different run. Returns
/// the state and the step resumed from.
fn resume(session: &Session, optimizer: &mut AdamW, fingerprint: String) -> Result<(TrainerState, Option<u64>)> {
    if !session.options.resume {
        return Ok((fresh_state(fingerprint), None));
    }
    let Some((_, dir)) = checkpoint::list(&session.output)?.pop() else {
        tracing::info!(output = %session.output.display(), "no checkpoint to resume from; starting at step 0");
        return Ok((fresh_state(fingerprint), None));
    };
    let state = restore(
        &dir,
        &session.model_config,
        session.config,
        &session.vars,
        optimizer,
        &session.options.device,
    )?;
    if state.fingerprint != fingerprint {
        return Err(TrainError::Checkpoint {
            path: dir,
            message: "the training settings differ from those the checkpoint was made with".into(),
        });
    }
    if let Some(m) = session.metrics() {
        m.resumed_from_step.set(state.step as f64);
    }
    tracing::info!(step = state.step, checkpoint = %dir.display(), "resuming");
    let step = state.step;
    Ok((state, Some(step)))
}

/// The eval loss before training: measured (and recorded at step 0) on a fresh run, taken from
/// the history on a resumed one, whose adapter has moved on since.
fn initial_eval(session: &Session, state: &mut TrainerState) -> Result<Option<f64>> {
    if state.step > 0 {
        return Ok(state.eval_history.first().map(|p| p.loss));
    }
    let loss = evaluate_at(session, 0)?;
    if let Some(loss) = loss {
        state.eval_history.push(LossPoint { step: 0, loss });
    }
    Ok(loss)
}

/// Tells the gauges and the progress observer where the loop starts and ends.
fn announce_start(session: &Session, state: &TrainerState) {
    if let Some(m) = session.metrics() {
        m.total_steps.set(session.plan.total_steps as f64);
        m.step.set(state.step as f64);
    }
    if let Some(p) = &session.options.progress {
        p.start(state.step, session.plan.total_steps);
    }
}

/// This process's part of the run (a resumed job has several): its wall time and tokens, on
/// top of what earlier parts recorded in the checkpoint.
struct Segment {
    started: Instant,
    tokens_at_start: u64,
    elapsed_before: f64,
}

impl Segment {
    fn start(state: &TrainerState) -> Self {
        Self {
            started: Instant::now(),
            tokens_at_start: state.tokens,
            elapsed_before: state.elapsed_secs,
        }
    }

    fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Tokens per second of this segment, with `tokens` the run's total so far.
    fn tokens_per_second(&self, tokens: u64, secs: f64) -> f64 {
        (tokens - self.tokens_at_start) as f64 / secs.max(1e-9)
    }
}

/// Steps until done or asked to stop; true when it stopped early (after a checkpoint), and the
/// last step's DPO statistics under `method: dpo`.
fn train_loop(
    session: &Session,
    optimizer: &mut AdamW,
    state: &mut TrainerState,
    segment: &Segment,
) -> Result<(bool, Option<DpoStats>)> {
    let t = &session.config.training;
    let total_steps = session.plan.total_steps;
    let mut timer = StepTimer::from_env(&session.options.device);
    let mut steps_timed = 0;
    let mut last_dpo = None;
    while state.step < total_steps {
        let done = train_step(session, optimizer, state, &mut timer)?;
        last_dpo = done.dpo.or(last_dpo);
        steps_timed += 1;
        report_step(session, state, &done, segment);
        if log_due(t, state.step) {
            timer.report(state.step, std::mem::take(&mut steps_timed));
        }
        let last = state.step == total_steps;
        if eval_due(t, state.step, last) {
            if let Some(loss) = evaluate_at(session, state.step)? {
                state.eval_history.push(LossPoint { step: state.step, loss });
            }
        }
        let stop_now = stop_due(session.options, state.step, last);
        if save_due(t, state.step, last) || stop_now {
            state.elapsed_secs = segment.elapsed_before + segment.secs();
            save_checkpoint(session, optimizer, state)?;
        }
        if stop_now {
            return Ok((true, last_dpo));
        }
    }
    Ok((false, last_dpo))
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StepDone {
    /// Mean loss per trained token of the step.
    loss: f64,
    /// Before clipping.
    grad_norm: f64,
    learning_rate: f64,
    /// The step's pairs under `method: dpo`; `loss` is then their DPO loss.
    dpo: Option<DpoStats>,
}

/// One optimizer step: the step's micro-batches forward and backward, their gradients summed,
/// clipped, and applied by AdamW; `state` advances by one step. A non-finite loss or gradient
/// norm fails the run instead of corrupting the adapter.
fn train_step(
    session: &Session,
    optimizer: &mut AdamW,
    state: &mut TrainerState,
    timer: &mut StepTimer,
) -> Result<StepDone> {
    let t = &session.config.training;
    let step = state.step;
    let (mut grads, loss, dpo) = if session.config.method == Method::Dpo {
        let (grads, stats) = dpo_step_gradients(session, state, timer)?;
        (grads, stats.loss, Some(stats))
    } else {
        let (grads, loss) = step_gradients(session, state, timer)?;
        (grads, loss, None)
    };
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
    let lr = learning_rate(
        t.learning_rate,
        t.scheduler,
        t.warmup_steps,
        step,
        session.plan.total_steps,
    );
    optimizer.step(&grads, lr)?;
    timer.mark("optimizer");
    state.step += 1;
    state.micro_batches += session.plan.accum;
    state.train_history.push(LossPoint { step: state.step, loss });
    Ok(StepDone {
        loss,
        grad_norm,
        learning_rate: lr,
        dpo,
    })
}

/// The summed gradients and the mean token loss of the step's micro-batches, counting their
/// tokens into `state`.
fn step_gradients(
    session: &Session,
    state: &mut TrainerState,
    timer: &mut StepTimer,
) -> Result<(BTreeMap<String, Tensor>, f64)> {
    let t = &session.config.training;
    let plan = &session.plan;
    let micro: Vec<Vec<&Example>> = (0..plan.accum)
        .map(|k| {
            micro_batch(
                &session.data.train,
                state.micro_batches + k,
                plan.batches_per_epoch,
                t.batch_size,
                t.seed,
            )
        })
        .collect();
    let step_targets: usize = micro.iter().flatten().map(|e| e.trained_tokens()).sum();
    // Dividing by the step's target count makes accumulation equal to one big batch.
    let scale = 1.0 / step_targets.max(1) as f64;
    let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut loss_sum = 0.0;
    for (k, batch) in micro.iter().enumerate() {
        let active = ActiveAdapter {
            adapter: &session.adapter,
            dropout_seed: Some(mix(t.seed, state.micro_batches + k as u64)),
            first_row: 0,
        };
        let targets = LossTargets::of(batch, session.tokenizer.eos, &session.options.device)?;
        timer.mark("batch");
        loss_sum += backward(session, &targets, active, scale, &mut grads)?;
        state.tokens += batch.iter().map(|e| e.ids.len() as u64).sum::<u64>();
        timer.mark("forward_backward");
    }
    Ok((grads, loss_sum / step_targets.max(1) as f64))
}

/// The summed gradients of the mean DPO loss over the step's pairs, and their statistics,
/// counting their tokens into `state` (see [`crate::dpo`] for how the gradient is taken).
fn dpo_step_gradients(
    session: &Session,
    state: &mut TrainerState,
    timer: &mut StepTimer,
) -> Result<(BTreeMap<String, Tensor>, DpoStats)> {
    let t = &session.config.training;
    let plan = &session.plan;
    let micro: Vec<Vec<usize>> = (0..plan.accum)
        .map(|k| {
            let g = state.micro_batches + k;
            let len = session.data.train_pairs.len();
            micro_batch_indices(len, g, plan.batches_per_epoch, t.batch_size, t.seed)
        })
        .collect();
    // The mean over the step's pairs makes accumulation equal to one big batch.
    let scale = 1.0 / micro.iter().map(Vec::len).sum::<usize>().max(1) as f64;
    let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut terms = Vec::new();
    let dpo = session.dpo_model();
    for (k, indices) in micro.iter().enumerate() {
        let seed = mix(t.seed, state.micro_batches + k as u64);
        let pairs: Vec<&Pair> = indices.iter().map(|&i| &session.data.train_pairs[i]).collect();
        let reference: Vec<(f64, f64)> = indices.iter().map(|&i| session.reference.train[i]).collect();
        terms.extend(dpo.accumulate(&pairs, &reference, Some(seed), scale, &mut grads)?);
        state.tokens += dpo::sequences(&pairs).iter().map(|e| e.ids.len() as u64).sum::<u64>();
        timer.mark("forward_backward");
    }
    Ok((grads, DpoStats::of(&terms)))
}

/// The DPO statistics of the held-out pairs with the adapter as it is now.
fn dpo_evaluate(session: &Session) -> Result<DpoStats> {
    let mut terms = Vec::new();
    let pairs: Vec<&Pair> = session.data.validation_pairs.iter().collect();
    let dpo = session.dpo_model();
    let size = session.config.training.batch_size;
    for (chunk, reference) in pairs.chunks(size).zip(session.reference.validation.chunks(size)) {
        terms.extend(dpo.score(chunk, reference, None)?);
    }
    Ok(DpoStats::of(&terms))
}

/// What a DPO micro-batch needs of a run; public so that a test can hold one batch's loss and
/// gradient to a reference computed outside.
pub struct DpoModel<'a> {
    pub model: &'a CausalLm,
    pub adapter: &'a LoraAdapter,
    pub vars: &'a [NamedVar],
    pub settings: DpoSettings,
    /// Pads the shorter sequences of a batch (EOS, as for SFT).
    pub pad: u32,
    pub device: &'a Device,
    pub gradient_checkpointing: bool,
}

impl DpoModel<'_> {
    /// The terms of `pairs`, with the gradients of `scale` times their summed loss added to
    /// `grads`; dropout from `dropout_seed` as in an SFT micro-batch. `reference` holds each
    /// pair's [`DpoModel::reference_logps`].
    pub fn accumulate(
        &self,
        pairs: &[&Pair],
        reference: &[(f64, f64)],
        dropout_seed: Option<u64>,
        scale: f64,
        grads: &mut BTreeMap<String, Tensor>,
    ) -> Result<Vec<dpo::PairTerms>> {
        let seqs = dpo::sequences(pairs);
        let terms = self.score(pairs, reference, dropout_seed)?;
        let weights = dpo::sequence_weights(&self.settings, &terms, &seqs);
        let targets = LossTargets::weighted(&seqs, &weights, self.pad, self.device)?;
        let active = ActiveAdapter {
            adapter: self.adapter,
            dropout_seed,
            first_row: 0,
        };
        backward_with(
            self.model,
            self.vars,
            self.gradient_checkpointing,
            &targets,
            active,
            scale,
            grads,
        )?;
        Ok(terms)
    }

    /// The terms of `pairs` against their `reference` log-probs, from a forward of the policy
    /// without a graph, with the dropout masks of `dropout_seed` (those the backward's forward
    /// draws).
    pub fn score(
        &self,
        pairs: &[&Pair],
        reference: &[(f64, f64)],
        dropout_seed: Option<u64>,
    ) -> Result<Vec<dpo::PairTerms>> {
        let detached = self.adapter.detached();
        let policy = self.logps(pairs, &detached, dropout_seed)?;
        // In the layout of [`dpo::sequences`]: every chosen answer, then every rejected one.
        let reference: Vec<f64> = reference
            .iter()
            .map(|r| r.0)
            .chain(reference.iter().map(|r| r.1))
            .collect();
        Ok(dpo::score(&self.settings, &policy, &reference))
    }

    /// The reference's (chosen, rejected) log-probs of each pair: the base with the adapter
    /// switched off, so no second copy of the weights is needed.
    pub fn reference_logps(&self, pairs: &[&Pair]) -> Result<Vec<(f64, f64)>> {
        let switched_off = LoraAdapter::from_pairs(self.adapter.config.clone(), BTreeMap::new());
        let logps = self.logps(pairs, &switched_off, None)?;
        let n = pairs.len();
        Ok((0..n).map(|i| (logps[i], logps[n + i])).collect())
    }

    /// The (chosen, rejected) log-probs of each pair under the adapter as it is now, without
    /// dropout: the reference of a run that starts from an existing adapter.
    pub fn adapter_logps(&self, pairs: &[&Pair]) -> Result<Vec<(f64, f64)>> {
        let logps = self.logps(pairs, &self.adapter.detached(), None)?;
        let n = pairs.len();
        Ok((0..n).map(|i| (logps[i], logps[n + i])).collect())
    }

    /// Each sequence's answer log-prob under `adapter`, as the loss uses it, in the layout of
    /// [`dpo::sequences`].
    fn logps(&self, pairs: &[&Pair], adapter: &LoraAdapter, dropout_seed: Option<u64>) -> Result<Vec<f64>> {
        let seqs = dpo::sequences(pairs);
        let targets = LossTargets::of(&seqs, self.pad, self.device)?;
        let active = ActiveAdapter {
            adapter,
            dropout_seed,
            first_row: 0,
        };
        let sums = targets.sequence_logps(self.model, active)?;
        Ok(sums
            .iter()
            .zip(&seqs)
            .map(|(&s, e)| dpo::as_used(&self.settings, s, e))
            .collect())
    }
}

/// Forward and backward over one micro-batch, with or without recomputing activations; adds
/// its gradients to `grads` and returns its loss sum.
fn backward(
    session: &Session,
    targets: &LossTargets,
    active: ActiveAdapter,
    scale: f64,
    grads: &mut BTreeMap<String, Tensor>,
) -> Result<f64> {
    let checkpointing = session.config.training.gradient_checkpointing;
    backward_with(
        &session.model,
        &session.vars,
        checkpointing,
        targets,
        active,
        scale,
        grads,
    )
}

/// [`backward`] from its parts.
fn backward_with(
    model: &CausalLm,
    vars: &[NamedVar],
    gradient_checkpointing: bool,
    targets: &LossTargets,
    active: ActiveAdapter,
    scale: f64,
    grads: &mut BTreeMap<String, Tensor>,
) -> Result<f64> {
    if gradient_checkpointing {
        let step = CheckpointedStep {
            adapter: active,
            loss_scale: scale,
            head_rows: HEAD_ROWS,
            recompute_sequences: targets.recompute_sequences()?,
        };
        let out = model.loss_backward_checkpointed(&targets.as_batch(), &step)?;
        for store in &out.stores {
            accumulate(grads, store, vars)?;
        }
        Ok(out.loss_sum)
    } else {
        let (sum, store) = model.loss_backward(&targets.as_batch(), &active, scale, HEAD_ROWS)?;
        accumulate(grads, &store, vars)?;
        Ok(sum)
    }
}

/// Hands a finished step to the gauges, the progress observer and, at the logging cadence,
/// the log.
fn report_step(session: &Session, state: &TrainerState, done: &StepDone, segment: &Segment) {
    let total_steps = session.plan.total_steps;
    let tps = segment.tokens_per_second(state.tokens, segment.secs());
    let epoch = session.plan.epoch(state.micro_batches);
    if let Some(m) = session.metrics() {
        m.train_loss.set(done.loss);
        m.step.set(state.step as f64);
        m.epoch.set(epoch);
        m.tokens_per_second.set(tps);
        m.learning_rate.set(done.learning_rate);
        m.grad_norm.set(done.grad_norm);
        if let Some(stats) = &done.dpo {
            m.set_dpo("train", stats);
        }
    }
    if let Some(p) = &session.options.progress {
        p.step(&StepProgress {
            step: state.step,
            total_steps,
            loss: done.loss,
            tokens_per_second: tps,
            epoch,
            learning_rate: done.learning_rate,
        });
    }
    if log_due(&session.config.training, state.step) {
        tracing::info!(
            step = state.step,
            total_steps,
            loss = done.loss,
            lr = done.learning_rate,
            grad_norm = done.grad_norm,
            epoch,
            tokens_per_second = tps,
            "train"
        );
        if let Some(d) = &done.dpo {
            tracing::info!(
                step = state.step,
                loss = d.loss,
                rewards_chosen = d.rewards_chosen,
                rewards_rejected = d.rewards_rejected,
                rewards_margins = d.rewards_margins,
                rewards_accuracies = d.rewards_accuracies,
                "dpo"
            );
        }
    }
}

/// Log after `step`? The first step too, so a slow run shows signs of life early.
fn log_due(t: &TrainingSettings, step: u64) -> bool {
    t.logging_steps > 0 && (step.is_multiple_of(t.logging_steps) || step == 1)
}

/// Evaluate after `step`? Never after the last: the finish evaluates then anyway.
fn eval_due(t: &TrainingSettings, step: u64, last: bool) -> bool {
    t.eval_steps > 0 && step.is_multiple_of(t.eval_steps) && !last
}

/// Checkpoint after `step` by cadence? Never after the last: the adapter itself is saved then.
fn save_due(t: &TrainingSettings, step: u64, last: bool) -> bool {
    t.save_steps > 0 && step.is_multiple_of(t.save_steps) && !last
}

/// Stop (after a checkpoint) after `step`, as preemption or `stop_after_steps` ask? A stop
/// asked for during the last step is moot: the run finishes instead.
fn stop_due(options: &RunOptions, step: u64, last: bool) -> bool {
    let stop_requested = options.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    (options.stop_after_steps.is_some_and(|s| step >= s) || stop_requested) && !last
}

/// Mean eval loss on the validation data with the adapter as it is now, reported to the log
/// and the gauge; None without validation data.
fn evaluate_at(session: &Session, step: u64) -> Result<Option<f64>> {
    if session.config.method == Method::Dpo {
        return Ok(dpo_evaluate_at(session, step)?.map(|s| s.loss));
    }
    if session.data.validation.is_empty() {
        return Ok(None);
    }
    let loss = evaluate(
        &session.model,
        &session.adapter,
        &session.data.validation,
        session.config.training.batch_size,
        session.tokenizer.eos,
        &session.options.device,
    )?;
    tracing::info!(step, eval_loss = loss, "eval");
    if let Some(m) = session.metrics() {
        m.eval_loss.set(loss);
    }
    Ok(Some(loss))
}

/// The held-out pairs' DPO statistics, reported to the log and the gauges (`eval_loss` is their
/// DPO loss); None without held-out pairs.
fn dpo_evaluate_at(session: &Session, step: u64) -> Result<Option<DpoStats>> {
    if session.data.validation_pairs.is_empty() {
        return Ok(None);
    }
    let d = dpo_evaluate(session)?;
    tracing::info!(
        step,
        eval_loss = d.loss,
        rewards_chosen = d.rewards_chosen,
        rewards_rejected = d.rewards_rejected,
        rewards_margins = d.rewards_margins,
        rewards_accuracies = d.rewards_accuracies,
        "dpo eval"
    );
    if let Some(m) = session.metrics() {
        m.eval_loss.set(d.loss);
        m.set_dpo("eval", &d);
    }
    Ok(Some(d))
}

/// Writes a checkpoint of the adapter, optimizer and `state`, then hands it to the
/// checkpoint hook (job mode uploads it).
fn save_checkpoint(session: &Session, optimizer: &AdamW, state: &TrainerState) -> Result<()> {
    let dir = checkpoint::save(
        &session.output,
        &session.adapter,
        &session.base_name,
        &optimizer.state(),
        state,
    )?;
    tracing::info!(step = state.step, checkpoint = %dir.display(), "checkpoint saved");
    if let Some(hook) = &session.options.on_checkpoint {
        hook(&dir, state.step)?;
    }
    Ok(())
}

/// How the loop went, for the finish.
struct RunSummary<'a> {
    started: Instant,
    segment: &'a Segment,
    initial_eval: Option<f64>,
    resumed_from: Option<u64>,
    stopped_early: bool,
    last_dpo: Option<DpoStats>,
}

/// After the loop: a completed run evaluates once more, saves the adapter and has it judged
/// (if asked); every run writes training_metrics.json.
fn finish(session: &Session, mut state: TrainerState, run: &RunSummary) -> Result<TrainingMetrics> {
    let dpo_run = session.config.method == Method::Dpo;
    let mut dpo_eval = None;
    let evaluation = if run.stopped_early {
        None
    } else {
        let loss = if dpo_run {
            dpo_eval = dpo_evaluate_at(session, state.step)?;
            dpo_eval.map(|d| d.loss)
        } else {
            evaluate_at(session, state.step)?
        };
        if let Some(loss) = loss {
            state.eval_history.push(LossPoint { step: state.step, loss });
        }
        peft::save(
            &session.output,
            &session.adapter,
            &session.model_config,
            &session.base_name,
        )?;
        let s = session;
        judge_if_asked(
            s.config,
            s.options,
            &s.model,
            &s.model_config,
            &s.adapter,
            &s.data,
            &s.tokenizer,
        )?
    };
    let segment_secs = run.segment.secs();
    let timing = Timing {
        duration_secs: run.segment.elapsed_before
            + segment_secs.max(run.started.elapsed().as_secs_f64().min(segment_secs)),
        tokens_per_second: run.segment.tokens_per_second(state.tokens, segment_secs),
    };
    let mut metrics = summarize(&state, &session.plan, &session.data, run, timing, evaluation);
    metrics.dpo = dpo_run.then_some(DpoMetrics {
        train: run.last_dpo,
        eval: dpo_eval,
    });
    write_metrics(&session.output, &metrics)?;
    Ok(metrics)
}

/// The run's times, measured once at the finish.
struct Timing {
    duration_secs: f64,
    tokens_per_second: f64,
}

/// training_metrics.json from the final state. A run stopped early reports no final eval loss:
/// the adapter it would describe was not saved.
fn summarize(
    state: &TrainerState,
    plan: &Plan,
    data: &Prepared,
    run: &RunSummary,
    timing: Timing,
    evaluation: Option<kubetune_crds::EvaluationResult>,
) -> TrainingMetrics {
    TrainingMetrics {
        steps: state.step,
        total_steps: plan.total_steps,
        completed: !run.stopped_early,
        epochs: plan.epoch(state.micro_batches),
        final_train_loss: state.train_history.last().map(|p| p.loss),
        best_train_loss: state.train_history.iter().map(|p| p.loss).reduce(f64::min),
        initial_eval_loss: run.initial_eval,
        final_eval_loss: if run.stopped_early {
            None
        } else {
            state.eval_history.last().map(|p| p.loss)
        },
        best_eval_loss: state.eval_history.iter().map(|p| p.loss).reduce(f64::min),
        train_tokens: state.tokens,
        duration_secs: timing.duration_secs,
        tokens_per_second: timing.tokens_per_second,
        train_sequences: data.train_units(),
        validation_sequences: data.validation.len().max(data.validation_pairs.len()),
        skipped_invalid: data.skipped_invalid,
        preparation: data.stats.clone(),
        resumed_from_step: run.resumed_from,
        train_history: state.train_history.clone(),
        eval_history: state.eval_history.clone(),
        evaluation,
        dpo: None,
    }
}

/// The adapter judged against the base model, when the config asks for it (see
/// [`crate::evaluate`]); after the adapter is saved, so a failure here loses no training.
fn judge_if_asked(
    config: &TrainConfig,
    options: &RunOptions,
    model: &CausalLm,
    model_config: &kubetune_model::Config,
    adapter: &LoraAdapter,
    data: &Prepared,
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
fn micro_batch<T>(train: &[T], g: u64, per_epoch: u64, batch_size: usize, seed: u64) -> Vec<&T> {
    micro_batch_indices(train.len(), g, per_epoch, batch_size, seed)
        .into_iter()
        .map(|i| &train[i])
        .collect()
}

/// The indices into the training data of [`micro_batch`].
fn micro_batch_indices(len: usize, g: u64, per_epoch: u64, batch_size: usize, seed: u64) -> Vec<usize> {
    let epoch = g / per_epoch;
    let index = (g % per_epoch) as usize;
    let order = epoch_order(len, seed, epoch);
    batches(&order, batch_size).get(index).cloned().unwrap_or_default()
}

/// Rows of logits computed at once (with the CPU's hand-written step, by all threads
/// together): 256 rows of a vocabulary of 32k are 32 MiB of f32, about what one recomputed
/// layer holds.
const HEAD_ROWS: usize = 256;

/// Tokens whose layer is recomputed at once under gradient checkpointing through candle's
/// graph off a GPU (bf16 on the CPU). Whole sequences go together up to this many: fewer hold
/// fewer activations, but matmuls of under ~512 rows ran slower (bench, 4 x 256 tokens: one
/// sequence at a time 586 tok/s and 291 MiB peak RSS, two 652 tok/s and 310 MiB, all four 671
/// tok/s and 366 MiB). The CPU's hand-written f32 step recomputes the whole batch, whose tape
/// of a layer is a fraction of what the graph held.
const RECOMPUTE_TOKENS: usize = 512;

/// [`RECOMPUTE_TOKENS`] on a GPU. A part of 512 tokens leaves most of the chip idle and
/// queues every kernel of the layer once per part: the H200's checkpointed LoRA ran at 0.43x
/// our plain step (4 x 512 tokens, one sequence a part), where a second forward should cost
/// about a third more. A layer's graph holds about 17 bf16 hidden-sized rows a token
/// (e2e/bench/step-memory.sh), so 8192 tokens of a hidden-4096 model are about 1.1 GiB.
const RECOMPUTE_TOKENS_GPU: usize = 8192;

/// Whole sequences of `len` tokens per recomputed part, at least one.
fn recompute_sequences_for(len: usize, on_gpu: bool) -> usize {
    let tokens = if on_gpu { RECOMPUTE_TOKENS_GPU } else { RECOMPUTE_TOKENS };
    (tokens / len.max(1)).max(1)
}

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
    /// Sequences per recomputed part, for [`RECOMPUTE_TOKENS`] or [`RECOMPUTE_TOKENS_GPU`].
    fn recompute_sequences(&self) -> Result<usize> {
        let (_, len) = self.input.dims2()?;
        Ok(recompute_sequences_for(len, self.input.device().is_cuda()))
    }

    fn of(batch: &[&Example], pad: u32, device: &Device) -> Result<Self> {
        Self::weighted(batch, &vec![1.0; batch.len()], pad, device)
    }

    /// As [`LossTargets::of`], each sequence's trained tokens weighted by its entry of
    /// `sequence_weights` instead of 1 (DPO's gradient, see [`crate::dpo`]).
    fn weighted(batch: &[&Example], sequence_weights: &[f32], pad: u32, device: &Device) -> Result<Self> {
        let len = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let rows = batch.len() * len;
        let (mut ids, mut targets, mut weights) = (
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
            Vec::with_capacity(rows),
        );
        let mut count = 0;
        for (e, &w) in batch.iter().zip(sequence_weights) {
            for i in 0..len {
                ids.push(e.ids.get(i).copied().unwrap_or(pad));
                let trained = e.trained.get(i + 1).copied().unwrap_or(false);
                targets.push(e.ids.get(i + 1).copied().unwrap_or(pad));
                weights.push(if trained { w } else { 0f32 });
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

    /// Each sequence's summed log-probability of its trained targets, one forward per
    /// sequence (the loss is a sum over the whole batch). Each forward is the sequence's padded
    /// row with `first_row` where the row starts in the batch, so its dropout masks are those
    /// the whole batch's forward draws for it.
    fn sequence_logps(&self, model: &CausalLm, adapter: ActiveAdapter) -> Result<Vec<f64>> {
        let (b, len) = self.input.dims2()?;
        (0..b)
            .map(|j| {
                let input = self.input.narrow(0, j, 1)?;
                let batch = LossBatch {
                    input_ids: &input,
                    targets: &self.targets.narrow(0, j * len, len)?,
                    weights: &self.weights.narrow(0, j * len, len)?,
                };
                let row = ActiveAdapter {
                    first_row: adapter.first_row + j * len,
                    ..adapter
                };
                let nll = model.loss_sum(&batch, &row, HEAD_ROWS)?.to_scalar::<f32>()?;
                Ok(-f64::from(nll))
            })
            .collect()
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
    let mut value = serde_json::json!({
        "model": config.base_model_name.as_ref().unwrap_or(&config.model), "method": config.method, "lora": config.lora, "training": t,
        "dataset": {
            "data": content(&d.path)?,
            "validation": d.validation_path.as_deref().map(content).transpose()?,
            "format": d.format, "validationSplit": d.validation_split, "skipInvalid": d.skip_invalid,
        },
    });
    // Only when set, so the fingerprints of checkpoints made before DPO existed still match.
    if let Some(dpo) = &config.dpo {
        value["dpo"] = serde_json::json!(dpo);
    }
    if let Some(q) = &config.quantization {
        value["quantization"] = serde_json::json!(q);
    }
    if let Some(from) = &config.init_from {
        value["initFrom"] = serde_json::json!(from.identity());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DataFormat, DatasetConfig, LoraSettings, Scheduler};
    use kubetune_model::tiny::{write_tiny_model, TinySpec};
    use kubetune_model::TargetModule;

    fn settings(f: impl FnOnce(&mut TrainingSettings)) -> TrainingSettings {
        let mut t = TrainingSettings {
            batch_size: 4,
            ..TrainingSettings::default()
        };
        f(&mut t);
        t
    }

    #[test]
    fn checkpointing_recomputes_whole_sequences_of_512_tokens_off_a_gpu_and_8192_on_one() {
        assert_eq!(recompute_sequences_for(256, false), 2);
        assert_eq!(recompute_sequences_for(512, false), 1);
        assert_eq!(recompute_sequences_for(512, true), 16);
        assert_eq!(recompute_sequences_for(4096, true), 2);
        // A sequence longer than the part is still recomputed whole.
        assert_eq!(recompute_sequences_for(20_000, true), 1);
        assert_eq!(recompute_sequences_for(0, false), 512);
    }

    #[test]
    fn whole_epochs_round_up_to_full_steps_unless_max_steps_is_set() {
        let t = settings(|t| {
            t.epochs = Some(3);
            t.gradient_accumulation_steps = 2;
        });
        // 10 sequences in batches of 4: 3 micro-batches an epoch, 2 steps an epoch.
        let plan = Plan::of(&t, 10);
        assert_eq!(
            plan,
            Plan {
                batches_per_epoch: 3,
                accum: 2,
                total_steps: 6
            }
        );
        assert_eq!(plan.epoch(6), 2.0);
        let limited = settings(|t| {
            t.epochs = Some(3);
            t.max_steps = Some(5);
        });
        assert_eq!(Plan::of(&limited, 10).total_steps, 5);
    }

    #[test]
    fn the_first_step_and_every_logging_interval_are_logged_and_nothing_when_it_is_zero() {
        let t = settings(|t| t.logging_steps = 5);
        let logged: Vec<u64> = (1..=12).filter(|&s| log_due(&t, s)).collect();
        assert_eq!(logged, [1, 5, 10]);
        let quiet = settings(|t| t.logging_steps = 0);
        assert!(!(1..=12).any(|s| log_due(&quiet, s)));
    }

    #[test]
    fn evaluation_and_checkpoints_follow_their_cadence_but_not_after_the_last_step() {
        let t = settings(|t| {
            t.eval_steps = 2;
            t.save_steps = 3;
        });
        assert!(eval_due(&t, 4, false) && !eval_due(&t, 5, false) && !eval_due(&t, 4, true));
        assert!(save_due(&t, 6, false) && !save_due(&t, 4, false) && !save_due(&t, 6, true));
        let never = settings(|t| {
            t.eval_steps = 0;
            t.save_steps = 0;
        });
        assert!(!(1..=12).any(|s| eval_due(&never, s, false) || save_due(&never, s, false)));
    }

    #[test]
    fn a_stop_request_or_the_step_limit_stops_the_run_unless_it_is_the_last_step() {
        let limited = RunOptions {
            stop_after_steps: Some(3),
            ..RunOptions::default()
        };
        assert!(!stop_due(&limited, 2, false));
        assert!(stop_due(&limited, 3, false));
        assert!(!stop_due(&limited, 3, true));
        let flag = Arc::new(AtomicBool::new(false));
        let signalled = RunOptions {
            stop: Some(flag.clone()),
            ..RunOptions::default()
        };
        assert!(!stop_due(&signalled, 1, false));
        flag.store(true, Ordering::SeqCst);
        assert!(stop_due(&signalled, 1, false));
        assert!(!stop_due(&signalled, 1, true));
    }

    fn state_with(train: &[f64], eval: &[f64]) -> TrainerState {
        let points = |losses: &[f64]| {
            losses
                .iter()
                .enumerate()
                .map(|(i, &loss)| LossPoint { step: i as u64, loss })
                .collect()
        };
        TrainerState {
            step: train.len() as u64,
            micro_batches: 2 * train.len() as u64,
            train_history: points(train),
            eval_history: points(eval),
            ..fresh_state(String::new())
        }
    }

    #[test]
    fn a_run_stopped_early_reports_no_final_eval_loss_but_keeps_its_bests() {
        let state = state_with(&[3.0, 1.0, 2.0], &[4.0, 2.5]);
        let plan = Plan {
            batches_per_epoch: 4,
            accum: 2,
            total_steps: 8,
        };
        let data = Prepared {
            train: Vec::new(),
            validation: Vec::new(),
            train_pairs: Vec::new(),
            validation_pairs: Vec::new(),
            stats: PrepareStats::default(),
            skipped_invalid: 0,
        };
        let segment = Segment::start(&state);
        let run = |stopped_early| RunSummary {
            started: Instant::now(),
            segment: &segment,
            initial_eval: Some(4.0),
            resumed_from: None,
            stopped_early,
            last_dpo: None,
        };
        let timing = || Timing {
            duration_secs: 1.0,
            tokens_per_second: 1.0,
        };
        let stopped = summarize(&state, &plan, &data, &run(true), timing(), None);
        assert!(!stopped.completed);
        assert_eq!(stopped.final_eval_loss, None);
        assert_eq!(
            (stopped.final_train_loss, stopped.best_train_loss),
            (Some(2.0), Some(1.0))
        );
        assert_eq!(stopped.best_eval_loss, Some(2.5));
        assert_eq!((stopped.steps, stopped.total_steps, stopped.epochs), (3, 8, 1.5));
        let completed = summarize(&state, &plan, &data, &run(false), timing(), None);
        assert!(completed.completed);
        assert_eq!(completed.final_eval_loss, Some(2.5));
    }

    /// The tiny model and six facts in `dir`, trained 2 micro-batches of 2 per step.
    fn tiny_config(dir: &Path) -> TrainConfig {
        let model = dir.join("model");
        write_tiny_model(&model, &TinySpec::default()).expect("tiny model");
        let data = dir.join("data.jsonl");
        let lines: Vec<String> = ["Ann", "Ben", "Carl", "Dora", "Emil", "Fay"]
            .iter()
            .map(|n| serde_json::json!({"instruction": format!("What does {n} like?"), "response": "tea"}).to_string())
            .collect();
        std::fs::write(&data, lines.join("\n")).expect("data");
        TrainConfig {
            model: model.display().to_string(),
            base_model_name: Some("kubetune/tiny-llama".into()),
            dataset: DatasetConfig {
                path: data.display().to_string(),
                format: DataFormat::Instruction,
                validation_split: None,
                validation_path: Some(data.display().to_string()),
                skip_invalid: false,
            },
            method: Method::Lora,
            lora: LoraSettings {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                target_modules: TargetModule::ALL.to_vec(),
            },
            training: TrainingSettings {
                max_steps: Some(4),
                batch_size: 2,
                gradient_accumulation_steps: 2,
                max_seq_length: 64,
                learning_rate: 1e-2,
                scheduler: Scheduler::Constant,
                logging_steps: 0,
                ..TrainingSettings::default()
            },
            output: dir.join("out").display().to_string(),
            evaluation: None,
            dpo: None,
            quantization: None,
            init_from: None,
        }
    }

    #[test]
    fn a_step_advances_the_state_by_its_micro_batches_and_tokens() {
        let dir = tempfile::tempdir().expect("dir");
        let config = tiny_config(dir.path());
        let options = RunOptions::default();
        let session = Session::open(&config, &options).expect("session");
        let mut optimizer = AdamW::new(&session.vars, 0.0).expect("optimizer");
        let mut state = fresh_state(String::new());
        let mut timer = StepTimer::from_env(&Device::Cpu);
        let done = train_step(&session, &mut optimizer, &mut state, &mut timer).expect("step");
        assert!(done.loss.is_finite() && done.loss > 0.0, "{done:?}");
        assert_eq!((state.step, state.micro_batches), (1, 2));
        assert!(state.tokens > 0);
        assert_eq!(
            state.train_history,
            [LossPoint {
                step: 1,
                loss: done.loss
            }]
        );
    }

    #[test]
    fn a_fresh_run_measures_its_initial_eval_loss_and_records_it_at_step_zero() {
        let dir = tempfile::tempdir().expect("dir");
        let config = tiny_config(dir.path());
        let options = RunOptions::default();
        let session = Session::open(&config, &options).expect("session");
        let mut state = fresh_state(String::new());
        let loss = initial_eval(&session, &mut state)
            .expect("eval")
            .expect("validation data");
        assert_eq!(state.eval_history, [LossPoint { step: 0, loss }]);
    }

    #[test]
    fn resume_continues_from_the_saved_checkpoint_and_refuses_other_settings() {
        let dir = tempfile::tempdir().expect("dir");
        let config = tiny_config(dir.path());
        let plain = RunOptions::default();
        let session = Session::open(&config, &plain).expect("session");
        let mut optimizer = AdamW::new(&session.vars, 0.0).expect("optimizer");
        let (mut state, resumed) = resume(&session, &mut optimizer, "fp".into()).expect("no resume asked");
        assert_eq!((state.step, resumed), (0, None));
        let mut timer = StepTimer::from_env(&Device::Cpu);
        train_step(&session, &mut optimizer, &mut state, &mut timer).expect("step");
        save_checkpoint(&session, &optimizer, &state).expect("checkpoint");

        let resuming = RunOptions {
            resume: true,
            ..RunOptions::default()
        };
        let again = Session::open(&config, &resuming).expect("session");
        let mut optimizer = AdamW::new(&again.vars, 0.0).expect("optimizer");
        let (restored, resumed) = resume(&again, &mut optimizer, "fp".into()).expect("resume");
        assert_eq!(resumed, Some(1));
        assert_eq!(
            (restored.micro_batches, restored.tokens, &restored.train_history),
            (state.micro_batches, state.tokens, &state.train_history)
        );
        let err = resume(&again, &mut optimizer, "other".into()).expect_err("other settings");
        assert!(err.to_string().contains("training settings differ"), "{err}");
    }

    #[test]
    fn per_sequence_log_probs_draw_the_dropout_masks_of_the_whole_batchs_backward() {
        let dir = tempfile::tempdir().expect("dir");
        let mut config = tiny_config(dir.path());
        config.lora.dropout = 0.3;
        let options = RunOptions::default();
        let session = Session::open(&config, &options).expect("session");
        // A non-zero B, so dropout changes the output.
        for v in &session.vars {
            let noise = Tensor::randn(0f32, 0.2, v.var.dims(), &Device::Cpu).expect("noise");
            v.var.set(&noise).expect("set");
        }
        let batch: Vec<&Example> = session.data.train.iter().take(3).collect();
        let weights = [0.5f32, -1.0, 2.0];
        let active = ActiveAdapter {
            adapter: &session.adapter,
            dropout_seed: Some(7),
            first_row: 0,
        };
        let detached = session.adapter.detached();
        let scored = LossTargets::of(&batch, session.tokenizer.eos, &Device::Cpu).expect("targets");
        let logps = scored
            .sequence_logps(
                &session.model,
                ActiveAdapter {
                    adapter: &detached,
                    ..active
                },
            )
            .expect("log-probs");
        let expected: f64 = logps.iter().zip(weights).map(|(l, w)| -l * f64::from(w)).sum();
        let weighted = LossTargets::weighted(&batch, &weights, session.tokenizer.eos, &Device::Cpu).expect("targets");
        let (sum, _) = session
            .model
            .loss_backward(&weighted.as_batch(), &active, 1.0, HEAD_ROWS)
            .expect("backward");
        assert!(
            (sum - expected).abs() < 1e-3 * expected.abs().max(1.0),
            "{sum} vs {expected}"
        );
        // Other masks give another loss: the comparison above is not blind to them.
        let other = ActiveAdapter {
            dropout_seed: Some(8),
            ..active
        };
        let (moved, _) = session
            .model
            .loss_backward(&weighted.as_batch(), &other, 1.0, HEAD_ROWS)
            .expect("backward");
        assert!((moved - expected).abs() > 1e-2, "{moved} vs {expected}");
    }

    #[test]
    fn resume_without_a_checkpoint_starts_at_step_zero() {
        let dir = tempfile::tempdir().expect("dir");
        let config = tiny_config(dir.path());
        let options = RunOptions {
            resume: true,
            ..RunOptions::default()
        };
        let session = Session::open(&config, &options).expect("session");
        let mut optimizer = AdamW::new(&session.vars, 0.0).expect("optimizer");
        let (state, resumed) = resume(&session, &mut optimizer, "fp".into()).expect("resume");
        assert_eq!((state.step, resumed), (0, None));
    }
}
