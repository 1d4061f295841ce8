//! The model card (README.md) published with every adapter version, as Hugging Face does: YAML
//! front matter (`base_model`, `library_name: peft`, `tags`) and Markdown saying what the
//! adapter was trained from, how, and how well, with a small inline SVG loss curve.
//!
//! It is rendered from values only (no clock, no paths of this pod), so the same run renders
//! the same bytes; the registry lists and hashes it like the adapter's other files.

use crate::checkpoint::LossPoint;
use crate::train::TrainingMetrics;
use kubetune_crds::trainer_contract::TrainerJob;
use kubetune_crds::{EvaluationResult, FineTuneMethod};
use kubetune_storage::{Sha256Digest, StorageError};
use serde::Serialize;
use std::fmt::Write;
use std::path::Path;
use tokio::io::AsyncBufReadExt;

/// A data file as the trainer read it (the local copy, so the digest is of what was trained on).
#[derive(Debug, Clone, PartialEq)]
pub struct DataFile {
    pub uri: String,
    pub sha256: Sha256Digest,
    /// Non-blank lines: one example each in JSONL.
    pub lines: u64,
}

impl DataFile {
    /// Hashes and counts the local copy of `uri`.
    pub async fn read(uri: &str, local: &Path) -> Result<Self, StorageError> {
        let io = |e| StorageError::Io {
            action: "reading",
            path: local.to_path_buf(),
            source: e,
        };
        let file = tokio::fs::File::open(local).await.map_err(io)?;
        let mut split = tokio::io::BufReader::new(file).split(b'\n');
        let mut lines = 0;
        while let Some(line) = split.next_segment().await.map_err(io)? {
            lines += u64::from(line.iter().any(|b| !b.is_ascii_whitespace()));
        }
        Ok(Self {
            uri: uri.to_string(),
            sha256: Sha256Digest::of_file(local).await?,
            lines,
        })
    }
}

/// Everything the card says.
pub struct CardInput<'a> {
    pub job: &'a TrainerJob,
    /// The base model's digest as [`crate::base_digest`] defines it (a job always has one).
    pub base_model_digest: Option<&'a Sha256Digest>,
    pub dataset: &'a DataFile,
    /// The file at `dataset.validationUri`, when the job names one.
    pub validation: Option<&'a DataFile>,
    pub metrics: &'a TrainingMetrics,
    /// The adapter version training started from (spec.initFrom), as its lineage.
    pub started_from: Option<&'a kubetune_storage::ResolvedAdapter>,
}

/// The model card's text.
pub fn render(c: &CardInput) -> String {
    let mut out = front_matter(c.job);
    let job = c.job;
    let _ = writeln!(out, "# {}\n", md(&job.adapter_name));
    let _ = writeln!(
        out,
        "A {} adapter for {}, trained by the kubetune FineTuneJob {}/{} (uid {}).\n",
        match job.method {
            FineTuneMethod::Lora => "LoRA",
            FineTuneMethod::Qlora => "QLoRA",
            FineTuneMethod::Dpo => "DPO (LoRA)",
        },
        md(&job.base_model_uri),
        md(&job.owner.namespace),
        md(&job.owner.name),
        md(&job.owner.uid),
    );
    base_model_section(&mut out, c);
    if let Some(start) = c.started_from {
        let _ = writeln!(
            out,
            "## Started from

- Adapter: {}@{} (manifest digest `{}`)
- URI: {}
",
            md(&start.name),
            start.version,
            start.digest,
            md(&start.uri)
        );
    }
    dataset_section(&mut out, c);
    hyperparameters_section(&mut out, job, c.metrics);
    evaluation_section(&mut out, c.metrics.evaluation.as_ref());
    if let Some(dpo) = &c.metrics.dpo {
        preference_section(&mut out, dpo);
    }
    losses_section(&mut out, c.metrics);
    out
}

#[derive(Serialize)]
struct FrontMatter {
    base_model: String,
    library_name: &'static str,
    pipeline_tag: &'static str,
    tags: Vec<String>,
}

/// YAML written by serde_yaml, so any URI is quoted correctly.
fn front_matter(job: &TrainerJob) -> String {
    let meta = FrontMatter {
        base_model: hub_id(&job.base_model_uri),
        library_name: "peft",
        pipeline_tag: "text-generation",
        tags: vec!["kubetune".into(), enum_name(&job.method), "peft".into()],
    };
    let yaml = serde_yaml::to_string(&meta).unwrap_or_default();
    format!("---\n{yaml}---\n\n")
}

/// Hugging Face's `base_model` is a repo id: `hf://org/model@rev` is `org/model`; other URIs
/// are kept whole (the body names the exact URI either way).
fn hub_id(uri: &str) -> String {
    match uri.strip_prefix("hf://") {
        Some(rest) => rest.split('@').next().unwrap_or(rest).to_string(),
        None => uri.to_string(),
    }
}

fn base_model_section(out: &mut String, c: &CardInput) {
    let digest = match c.base_model_digest {
        Some(d) => format!("`{d}` (how to recompute it: kubetune's docs/models.md)"),
        // Not hashed (a card rendered outside a job).
        None => "none recorded: the base model is identified by its URI alone; a revision pinned in it \
                 (`hf://org/model@<commit>`) makes that exact"
            .to_string(),
    };
    let _ = writeln!(
        out,
        "## Base model\n\n- URI: {}\n- Digest: {digest}\n",
        md(&c.job.base_model_uri)
    );
}

fn dataset_section(out: &mut String, c: &CardInput) {
    out.push_str("## Dataset\n\n| Split | URI | sha256 | Lines |\n|---|---|---|---:|\n");
    for (split, file) in [("train", Some(c.dataset)), ("validation", c.validation)] {
        if let Some(f) = file {
            let _ = writeln!(out, "| {split} | {} | `{}` | {} |", md(&f.uri), f.sha256, f.lines);
        }
    }
    let m = c.metrics;
    // Preference data is counted, truncated and dropped by the pair.
    let unit = if c.job.method == FineTuneMethod::Dpo {
        "pairs"
    } else {
        "sequences"
    };
    let _ = write!(
        out,
        "\nFormat {}. After preparation: {} training and {} validation {unit}",
        enum_name(&c.job.dataset.format),
        m.train_sequences,
        m.validation_sequences,
    );
    if c.validation.is_none() {
        if let Some(split) = c.job.dataset.validation_split {
            let _ = write!(out, " (validation split off the training file: {split})");
        }
    }
    let _ = writeln!(
        out,
        "; {} invalid lines skipped, {} {unit} truncated, {} dropped with no trained token.\n",
        m.skipped_invalid, m.preparation.truncated, m.preparation.dropped_no_target
    );
}

fn hyperparameters_section(out: &mut String, job: &TrainerJob, m: &TrainingMetrics) {
    let t = &job.training;
    let lora = &job.lora;
    let targets: Vec<String> = lora.target_modules.iter().map(enum_name).collect();
    let mut rows = vec![
        ("method", enum_name(&job.method)),
        ("LoRA r", lora.r.to_string()),
        ("LoRA alpha", lora.alpha.to_string()),
        ("LoRA dropout", lora.dropout.to_string()),
        ("target modules", targets.join(", ")),
    ];
    if let Some(d) = &job.dpo {
        rows.extend([
            ("DPO beta", d.beta.to_string()),
            ("DPO loss", enum_name(&d.loss)),
            ("DPO label smoothing", d.label_smoothing.to_string()),
        ]);
    }
    if let Some(q) = &job.quantization {
        let double = if q.double_quant { ", double quantization" } else { "" };
        rows.push((
            "quantization",
            format!("{} {}-bit{double}", enum_name(&q.quant_type), q.bits),
        ));
    }
    rows.extend([
        ("epochs", t.epochs.map_or("-".into(), |e| e.to_string())),
        ("max steps", t.max_steps.map_or("-".into(), |s| s.to_string())),
        (
            "steps trained",
            format!("{} of {} ({:.2} epochs)", m.steps, m.total_steps, m.epochs),
        ),
        ("learning rate", t.learning_rate.to_string()),
        ("batch size", t.batch_size.to_string()),
        ("gradient accumulation steps", t.gradient_accumulation_steps.to_string()),
        ("max sequence length", t.max_seq_length.to_string()),
        ("scheduler", enum_name(&t.scheduler)),
        ("warmup steps", t.warmup_steps.to_string()),
        ("seed", t.seed.to_string()),
    ]);
    out.push_str("## Hyperparameters\n\n| Parameter | Value |\n|---|---|\n");
    for (name, value) in rows {
        let _ = writeln!(out, "| {name} | {} |", md(&value));
    }
    out.push('\n');
}

fn evaluation_section(out: &mut String, e: Option<&EvaluationResult>) {
    out.push_str("## Evaluation\n\n");
    let Some(e) = e else {
        out.push_str("Not judged: the FineTuneJob has no `spec.evaluation`.\n\n");
        return;
    };
    let metric = e.metric.as_ref().map(enum_name);
    let _ = write!(out, "| Model | Held-out loss |");
    if let Some(name) = &metric {
        let _ = write!(out, " {} |", md(name));
    }
    out.push_str(if metric.is_some() {
        "\n|---|---:|---:|\n"
    } else {
        "\n|---|---:|\n"
    });
    for (model, scores) in [("base", &e.base), ("adapter", &e.adapter)] {
        let _ = write!(out, "| {model} | {} |", number(scores.loss));
        if metric.is_some() {
            let _ = write!(out, " {} |", number(scores.score));
        }
        out.push('\n');
    }
    let _ = writeln!(out, "\nOn {} held-out examples.\n", e.examples);
}

/// A DPO run's rewards (beta times the log-prob ratio to the base model), as TRL logs them.
fn preference_section(out: &mut String, d: &crate::train::DpoMetrics) {
    out.push_str(
        "## Preference optimisation\n\n| Pairs | Chosen reward | Rejected reward | Margin | Accuracy |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for (which, stats) in [("last step", &d.train), ("held out", &d.eval)] {
        if let Some(s) = stats {
            let _ = writeln!(
                out,
                "| {which} ({}) | {} | {} | {} | {} |",
                s.pairs,
                number(Some(s.rewards_chosen)),
                number(Some(s.rewards_rejected)),
                number(Some(s.rewards_margins)),
                number(Some(s.rewards_accuracies)),
            );
        }
    }
    out.push_str("\nAccuracy: the share of pairs whose chosen answer gains more over the base model than the rejected one. The losses below are DPO losses.\n\n");
}

fn losses_section(out: &mut String, m: &TrainingMetrics) {
    out.push_str("## Training losses\n\n| Loss | Final | Best |\n|---|---:|---:|\n");
    let _ = writeln!(
        out,
        "| train | {} | {} |",
        number(m.final_train_loss),
        number(m.best_train_loss)
    );
    if m.final_eval_loss.is_some() {
        let _ = writeln!(
            out,
            "| eval | {} | {} |",
            number(m.final_eval_loss),
            number(m.best_eval_loss)
        );
    }
    out.push('\n');
    match loss_curve(&m.train_history, &m.eval_history) {
        Some(svg) => {
            let _ = writeln!(out, "Loss by step (line: train, dots: eval):\n\n{svg}");
        }
        None => out.push_str("No steps were logged.\n"),
    }
}

const WIDTH: f64 = 480.0;
const HEIGHT: f64 = 200.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

/// An inline SVG: the train loss as one polyline (a point per logged step), eval losses as
/// dots. None without a finite train point. Coordinates have one decimal, so the text is
/// stable; it has no blank line, which would end Markdown's HTML block.
fn loss_curve(train: &[LossPoint], eval: &[LossPoint]) -> Option<String> {
    let finite = |ps: &[LossPoint]| -> Vec<LossPoint> { ps.iter().copied().filter(|p| p.loss.is_finite()).collect() };
    let (train, eval) = (finite(train), finite(eval));
    if train.is_empty() {
        return None;
    }
    let all = || train.iter().chain(&eval);
    let (step_lo, step_hi) = bounds(all().map(|p| p.step as f64));
    let (loss_lo, loss_hi) = bounds(all().map(|p| p.loss));
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |step: u64| LEFT + (step as f64 - step_lo) / (step_hi - step_lo) * plot_w;
    let y = |loss: f64| TOP + (loss_hi - loss) / (loss_hi - loss_lo) * plot_h;

    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" font-family=\"sans-serif\" font-size=\"10\">\n<title>{}</title>\n",
        xml("Loss by step: train (line), eval (dots)")
    );
    let _ = writeln!(
        svg,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#ccc\"/>"
    );
    let points: Vec<String> = train
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.step), y(p.loss)))
        .collect();
    let _ = writeln!(
        svg,
        "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>",
        points.join(" ")
    );
    for p in &eval {
        let _ = writeln!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#ff7f0e\"/>",
            x(p.step),
            y(p.loss)
        );
    }
    let labels = [
        (LEFT - 4.0, TOP + 4.0, "end", format!("{loss_hi:.3}")),
        (LEFT - 4.0, TOP + plot_h, "end", format!("{loss_lo:.3}")),
        (LEFT, HEIGHT - 10.0, "start", format!("step {step_lo}")),
        (WIDTH - RIGHT, HEIGHT - 10.0, "end", format!("step {step_hi}")),
    ];
    for (lx, ly, anchor, text) in labels {
        let _ = writeln!(
            svg,
            "<text x=\"{lx}\" y=\"{ly}\" text-anchor=\"{anchor}\">{}</text>",
            xml(&text)
        );
    }
    svg.push_str("</svg>\n");
    Some(svg)
}

/// Lowest and highest value, widened when they are equal so that scaling never divides by 0.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

fn number(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

/// An enum's name as the FineTuneJob spells it (its serde name: `lora`, `q_proj`, `exactMatch`).
pub(crate) fn enum_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// Text safe in Markdown (no emphasis, links, code spans or table cells opened by it) and in
/// the HTML Markdown allows: user-chosen names and URIs render as written. Not for use inside
/// a code span, where Markdown takes backslashes literally.
pub fn md(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\\' | '`' | '*' | '_' | '[' | ']' | '|' | '#' | '~' | '!' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Text safe in SVG (XML) content and attributes.
fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::PrepareStats;
    use kubetune_crds::trainer_contract::{JobIdentity, TrainerDataset, TrainerLora, TrainerTraining};
    use kubetune_crds::{DatasetFormat, EvaluationMetric, LrScheduler, ModelEvaluation, TargetModule};

    fn job(name: &str, base_model_uri: &str) -> TrainerJob {
        TrainerJob {
            owner: JobIdentity {
                namespace: "ns".into(),
                name: "triage".into(),
                uid: "uid-1".into(),
            },
            base_model_uri: base_model_uri.into(),
            dataset: TrainerDataset {
                uri: "s3://data/train.jsonl".into(),
                format: DatasetFormat::Instruction,
                validation_split: None,
                validation_uri: Some("s3://data/held_out.jsonl".into()),
                skip_invalid: false,
            },
            method: FineTuneMethod::Lora,
            lora: TrainerLora {
                r: 16,
                alpha: 32.0,
                dropout: 0.05,
                target_modules: vec![TargetModule::QProj, TargetModule::VProj],
            },
            quantization: None,
            training: TrainerTraining {
                epochs: Some(3),
                max_steps: None,
                learning_rate: 2e-4,
                batch_size: 8,
                gradient_accumulation_steps: 2,
                max_seq_length: 512,
                warmup_steps: 10,
                scheduler: LrScheduler::Cosine,
                seed: 42,
                checkpoint_steps: None,
                gradient_checkpointing: false,
            },
            adapter_name: name.into(),
            registry: "s3://registry".into(),
            checkpoint_uri: "s3://checkpoints".into(),
            evaluation: None,
            dpo: None,
            init_from: None,
            merge: false,
        }
    }

    fn points(losses: &[(u64, f64)]) -> Vec<LossPoint> {
        losses.iter().map(|&(step, loss)| LossPoint { step, loss }).collect()
    }

    /// training_metrics.json of a 4-step run with eval before, half way and after, judged.
    fn metrics() -> TrainingMetrics {
        TrainingMetrics {
            steps: 4,
            total_steps: 4,
            completed: true,
            epochs: 3.0,
            final_train_loss: Some(0.75),
            best_train_loss: Some(0.5),
            initial_eval_loss: Some(2.5),
            final_eval_loss: Some(0.875),
            best_eval_loss: Some(0.8125),
            train_tokens: 1000,
            duration_secs: 1.0,
            tokens_per_second: 1000.0,
            train_sequences: 300,
            validation_sequences: 60,
            skipped_invalid: 0,
            preparation: PrepareStats::default(),
            resumed_from_step: None,
            train_history: points(&[(1, 2.25), (2, 1.5), (3, 0.5), (4, 0.75)]),
            eval_history: points(&[(0, 2.5), (2, 0.8125), (4, 0.875)]),
            evaluation: Some(EvaluationResult {
                metric: Some(EvaluationMetric::LabelAccuracy),
                base: ModelEvaluation {
                    loss: Some(2.5),
                    score: Some(0.25),
                },
                adapter: ModelEvaluation {
                    loss: Some(0.875),
                    score: Some(0.9),
                },
                examples: 60,
                display: None,
            }),
            dpo: None,
        }
    }

    fn data_file(uri: &str, hex_digit: char, lines: u64) -> DataFile {
        DataFile {
            uri: uri.into(),
            sha256: Sha256Digest::parse("test", &format!("sha256:{}", hex_digit.to_string().repeat(64))).unwrap(),
            lines,
        }
    }

    fn card(job: &TrainerJob, metrics: &TrainingMetrics) -> String {
        render(&CardInput {
            job,
            base_model_digest: None,
            started_from: None,
            dataset: &data_file("s3://data/train.jsonl", 'a', 300),
            validation: Some(&data_file("s3://data/held_out.jsonl", 'b', 60)),
            metrics,
        })
    }

    fn polyline_points(card: &str) -> Vec<&str> {
        let start = card.find("<polyline").expect("a polyline");
        let attr = &card[start..];
        let attr = &attr[attr.find("points=\"").expect("points") + 8..];
        attr[..attr.find('"').expect("closing quote")].split(' ').collect()
    }

    #[test]
    fn the_card_has_front_matter_and_every_section_from_the_metrics() {
        let metrics = metrics();
        let text = card(&job("triage", "hf://Qwen/Qwen2.5-0.5B@main"), &metrics);
        assert!(
            text.starts_with(
                "---\nbase_model: Qwen/Qwen2.5-0.5B\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n- kubetune\n- lora\n- peft\n---\n\n# triage\n"
            ),
            "{text}"
        );
        for needle in [
            "- URI: hf://Qwen/Qwen2.5-0.5B@main",
            "- Digest: none recorded: the base model is identified by its URI alone",
            &format!("| train | s3://data/train.jsonl | `sha256:{}` | 300 |", "a".repeat(64)),
            &format!(
                "| validation | s3://data/held\\_out.jsonl | `sha256:{}` | 60 |",
                "b".repeat(64)
            ),
            "A LoRA adapter for hf://Qwen/Qwen2.5-0.5B@main, trained by the kubetune FineTuneJob ns/triage (uid uid-1).",
            "300 training and 60 validation sequences; 0 invalid lines skipped",
            "| method | lora |",
            "| LoRA r | 16 |",
            "| LoRA alpha | 32 |",
            "| LoRA dropout | 0.05 |",
            "| target modules | q\\_proj, v\\_proj |",
            "| epochs | 3 |",
            "| steps trained | 4 of 4 (3.00 epochs) |",
            "| learning rate | 0.0002 |",
            "| batch size | 8 |",
            "| gradient accumulation steps | 2 |",
            "| max sequence length | 512 |",
            "| scheduler | cosine |",
            "| seed | 42 |",
            "| Model | Held-out loss | labelAccuracy |",
            "| base | 2.5000 | 0.2500 |",
            "| adapter | 0.8750 | 0.9000 |",
            "On 60 held-out examples.",
            "| train | 0.7500 | 0.5000 |",
            "| eval | 0.8750 | 0.8125 |",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(text.contains("<svg xmlns=\"http://www.w3.org/2000/svg\"") && text.trim_end().ends_with("</svg>"));
        assert_eq!(
            polyline_points(&text).len(),
            metrics.train_history.len(),
            "one point per logged step"
        );
        assert_eq!(
            text.matches("<circle").count(),
            metrics.eval_history.len(),
            "a dot per eval"
        );
        let svg = &text[text.find("<svg").unwrap()..text.find("</svg>").unwrap()];
        assert!(!svg.contains("\n\n"), "no blank line inside the SVG's HTML block");
        assert_eq!(
            text,
            card(&job("triage", "hf://Qwen/Qwen2.5-0.5B@main"), &metrics),
            "deterministic"
        );
    }

    #[test]
    fn the_curve_spans_the_plot_from_the_first_step_to_the_last_and_lowest_to_highest_loss() {
        let text = card(&job("triage", "s3://models/base"), &metrics());
        let points = polyline_points(&text);
        // Steps 0..4 over x 52..468; losses 0.5..2.5 over y 172..12 (SVG's y grows downwards).
        assert_eq!(points, ["156.0,32.0", "260.0,92.0", "364.0,172.0", "468.0,152.0"]);
    }

    #[test]
    fn markdown_and_html_special_characters_in_names_and_uris_are_escaped() {
        let mut j = job("bot", "s3://models/<script>alert(1)</script>|*x*_[y](z)`#");
        j.owner.name = "a&b".into();
        let text = card(&j, &metrics());
        // The front matter is data (YAML, checked below); the Markdown after it is rendered.
        let markdown = &text[text.find("\n# bot").unwrap()..];
        assert!(!markdown.contains("<script>"), "{text}");
        assert!(
            text.contains("- URI: s3://models/&lt;script&gt;alert(1)&lt;/script&gt;\\|\\*x\\*\\_\\[y\\](z)\\`\\#"),
            "{text}"
        );
        assert!(text.contains("FineTuneJob ns/a&amp;b"), "{text}");
        // The YAML front matter quotes what YAML would misread.
        let body = &text[4..];
        let meta: serde_yaml::Value =
            serde_yaml::from_str(&body[..body.find("---").unwrap()]).expect("front matter is YAML");
        assert_eq!(meta["base_model"], serde_yaml::Value::from(j.base_model_uri.as_str()));
        assert_eq!(xml("a<b & \"c\" 'd'>"), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;");
    }

    #[test]
    fn without_evaluation_or_logged_steps_the_card_says_so() {
        let mut m = metrics();
        m.evaluation = None;
        m.train_history.clear();
        m.eval_history.clear();
        m.final_eval_loss = None;
        let text = card(&job("bot", "s3://models/base"), &m);
        assert!(
            text.contains("Not judged: the FineTuneJob has no `spec.evaluation`."),
            "{text}"
        );
        assert!(text.contains("No steps were logged."), "{text}");
        assert!(!text.contains("<svg") && !text.contains("| eval |"), "{text}");
    }

    #[test]
    fn a_dpo_card_has_its_settings_and_the_rewards_of_the_last_step_and_the_held_out_pairs() {
        let mut j = job("tone", "s3://models/base");
        j.method = FineTuneMethod::Dpo;
        j.dpo = Some(kubetune_crds::trainer_contract::TrainerDpo {
            beta: 0.1,
            loss: kubetune_crds::DpoLossType::Ipo,
            label_smoothing: 0.0,
        });
        let stats = |accuracy| crate::dpo::DpoStats {
            loss: 0.5,
            rewards_chosen: 1.0,
            rewards_rejected: -0.5,
            rewards_margins: 1.5,
            rewards_accuracies: accuracy,
            pairs: 4,
        };
        let mut m = metrics();
        m.dpo = Some(crate::train::DpoMetrics {
            train: Some(stats(1.0)),
            eval: Some(stats(0.75)),
        });
        let text = card(&j, &m);
        assert!(
            text.contains("| DPO loss | ipo |") && text.contains("| DPO beta | 0.1 |"),
            "{text}"
        );
        assert!(
            text.contains("| held out (4) | 1.0000 | -0.5000 | 1.5000 | 0.7500 |"),
            "{text}"
        );
        assert!(text.contains("validation pairs"), "{text}");
        assert!(!card(&job("sft", "s3://m"), &metrics()).contains("## Preference optimisation"));
    }

    #[tokio::test]
    async fn a_data_file_is_hashed_and_its_non_blank_lines_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"a\":1}\n\n  \n{\"a\":2}").unwrap();
        let f = DataFile::read("s3://d/d.jsonl", &path).await.unwrap();
        assert_eq!(f.lines, 2);
        assert_eq!(f.sha256, Sha256Digest::of(b"{\"a\":1}\n\n  \n{\"a\":2}"));
    }
}
