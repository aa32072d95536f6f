//! End-to-end training on the CPU: the tiny model on the bundled data learns, and the output files
//! have the documented shape.

use clap::Parser;
use trainer::Args;
use trainer::train::train;

type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

fn read_losses(dir: &std::path::Path) -> Vec<(u64, f64)> {
    read_field(dir, "loss")
}

fn read_field(dir: &std::path::Path, field: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["learning_rate"].is_number(), "{l}");
            (v["step"].as_u64().unwrap(), v[field].as_f64().unwrap())
        })
        .collect()
}

/// burn-ndarray has no half-precision tensors: `--dtype bf16` on it is refused before any work, with
/// a message that says so and what to use instead (the mixed-precision path itself is tested on
/// wgpu in `tests/tests/mixed_precision.rs` and run on CUDA).
#[test]
fn half_precision_on_ndarray_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let args = Args::try_parse_from(["trainer", "--dtype", "bf16", "--output-dir", dir.path().to_str().unwrap()]).unwrap();
    let err = train::<B>(&args, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("--dtype bf16") && err.contains("no bf16 tensors") && err.contains("--device cuda"), "{err}");
    assert!(!dir.path().join("metrics.jsonl").exists(), "nothing trained");
}

#[test]
fn tiny_model_loss_falls_and_outputs_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let args = Args::try_parse_from([
        "trainer",
        "--max-steps",
        "16",
        "--per-device-train-batch-size",
        "8",
        "--output-dir",
        out.to_str().unwrap(),
    ])
    .unwrap();
    let summary = train::<B>(&args, &Default::default()).unwrap();
    let losses = read_losses(&out);
    assert_eq!(losses.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=16).collect::<Vec<_>>());
    let first: f64 = losses[..4].iter().map(|(_, l)| l).sum::<f64>() / 4.0;
    let last: f64 = losses[12..].iter().map(|(_, l)| l).sum::<f64>() / 4.0;
    assert!(last < first - 0.5, "loss did not fall enough: first 4 mean {first:.3}, last 4 mean {last:.3}");

    let summary_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap()).unwrap();
    for key in ["train_runtime", "train_loss", "tokens_per_second"] {
        assert!(summary_json[key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(summary_json["gpu_mem_used_peak"].is_null() && summary_json["gpu_mem_alloc"].is_null());
    assert!((summary.train_loss - losses.iter().map(|(_, l)| l).sum::<f64>() / 16.0).abs() < 1e-9);
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    // 2 micro-batches of 4, each loss normalised by the step's target tokens, give the gradient of one
    // batch of 8. The language-model loss of step 1 agrees to float rounding; later steps agree
    // closely but not exactly, because the load-balancing loss is a product of batch means (as in
    // HF, it is computed per micro-batch), so its gradient depends on the split.
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, bs: &str, accum: &str| {
        let out = dir.path().join(name);
        let args = Args::try_parse_from([
            "trainer",
            "--max-steps",
            "3",
            "--per-device-train-batch-size",
            bs,
            "--gradient-accumulation-steps",
            accum,
            "--output-dir",
            out.to_str().unwrap(),
        ])
        .unwrap();
        train::<B>(&args, &Default::default()).unwrap();
        read_field(&out, "lm_loss")
    };
    let big = run("big", "8", "1");
    let split = run("split", "4", "2");
    assert_eq!(big.len(), 3);
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs();
    assert!(rel(big[0].1, split[0].1) < 1e-5, "step 1: big batch {:?} vs accumulated {:?}", big[0], split[0]);
    for ((_, a), (_, b)) in big.iter().zip(&split) {
        assert!(rel(*a, *b) < 2e-3, "big batch {a} vs accumulated {b}");
    }
}

#[test]
fn scheduler_flags_drive_the_logged_learning_rate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cos");
    let args = Args::try_parse_from([
        "trainer", "--max-steps", "4", "--per-device-train-batch-size", "2", "--learning-rate", "1e-3",
        "--lr-scheduler-type", "cosine", "--warmup-ratio", "0.3", "--output-dir", out.to_str().unwrap(),
    ])
    .unwrap();
    train::<B>(&args, &Default::default()).unwrap();
    let lrs: Vec<f64> = read_field(&out, "learning_rate").into_iter().map(|(_, v)| v).collect();
    // warmup = ceil(0.3 * 4) = 2: steps 0, 1 warm up; then 0.5 * (1 + cos(pi * (s - 2) / 2)).
    let expected = [0.0, 0.5e-3, 1e-3, 0.5e-3];
    for (got, want) in lrs.iter().zip(expected) {
        assert!((got - want).abs() < 1e-15, "{lrs:?} vs {expected:?}");
    }
}

#[test]
fn packing_trains_on_full_rows() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("packed");
    let args = Args::try_parse_from([
        "trainer", "--max-steps", "3", "--per-device-train-batch-size", "2", "--max-seq-length", "64",
        "--packing", "--output-dir", out.to_str().unwrap(),
    ])
    .unwrap();
    let records = trainer::load_records(None).unwrap();
    let ds = trainer::TrainDataset::new_packed(&records, trainer::PromptStyle::Compact, 64, &trainer::Tokenizer::default())
        .unwrap();
    let unpacked_tokens: usize = records
        .iter()
        .map(|r| trainer::build_example(&trainer::Tokenizer::default(), r, trainer::PromptStyle::Compact, usize::MAX).unwrap().len())
        .sum();
    assert_eq!(ds.len(), unpacked_tokens.div_ceil(64));
    assert!(ds.examples()[..ds.len() - 1].iter().all(|r| r.len() == 64));
    train::<B>(&args, &Default::default()).unwrap();
    let losses = read_losses(&out);
    assert_eq!(losses.len(), 3);
    // Byte-level vocabulary of 259: a fresh model starts near ln(259) = 5.56.
    assert!((losses[0].1 - 259f64.ln()).abs() < 0.5, "{losses:?}");
}

/// `--gradient-checkpointing` keeps only each decoder layer's input and runs the layer again in the
/// backward pass: the same computation, so losses and gradient norms equal the run that keeps
/// everything (with gradient accumulation, and with LoRA on every projection and the scatter path;
/// without LoRA dropout, whose masks come from per-layer seeds under recomputation, so that the
/// re-run draws the first run's, and from the backend's RNG otherwise). It cannot be combined with
/// `--fsdp-gather step`, which runs the whole model at once.
#[test]
fn gradient_checkpointing_recomputes_the_same_training_run() {
    let lora = ["--use-lora", "all", "--lora-dropout", "0", "--moe-kernel", "scatter"];
    for extra in [&["--gradient-accumulation-steps", "2"][..], &lora[..]] {
        let run = |checkpointing: bool| {
            let dir = tempfile::tempdir().unwrap();
            let mut v = vec!["trainer", "--max-steps", "4", "--per-device-train-batch-size", "4", "--output-dir"];
            v.push(dir.path().to_str().unwrap());
            v.extend_from_slice(extra);
            if checkpointing {
                v.push("--gradient-checkpointing");
            }
            train::<B>(&Args::try_parse_from(&v).unwrap(), &Default::default()).unwrap();
            (read_losses(dir.path()), read_field(dir.path(), "grad_norm"))
        };
        let (kept, recomputed) = (run(false), run(true));
        assert_eq!(kept.0.len(), 4);
        for ((a, b), what) in [(&kept.0, &recomputed.0), (&kept.1, &recomputed.1)].into_iter().zip(["loss", "grad_norm"]) {
            for ((step, x), (_, y)) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{extra:?} step {step} {what}: kept {x} vs recomputed {y}");
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let args = Args::try_parse_from(["trainer", "--gradient-checkpointing", "--fsdp-gather", "step", "--output-dir", dir.path().to_str().unwrap()]).unwrap();
    let err = train::<B>(&args, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("--gradient-checkpointing") && err.contains("--fsdp-gather step"), "{err}");
}

/// Protobuf wire-format fields of one message: (field number, value) with varints as `Int`,
/// fixed32/fixed64 as raw bits and length-delimited fields as bytes.
#[derive(Debug)]
enum Field {
    Int(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(Vec<u8>),
}

fn parse_message(mut b: &[u8]) -> Vec<(u64, Field)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = b[0];
            *b = &b[1..];
            v |= u64::from(byte & 0x7F) << shift;
            if byte < 0x80 {
                break;
            }
        }
        v
    }
    let mut fields = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let value = match key & 7 {
            0 => Field::Int(varint(&mut b)),
            1 => {
                let v = u64::from_le_bytes(b[..8].try_into().unwrap());
                b = &b[8..];
                Field::Fixed64(v)
            }
            2 => {
                let n = varint(&mut b) as usize;
                let v = b[..n].to_vec();
                b = &b[n..];
                Field::Bytes(v)
            }
            5 => {
                let v = u32::from_le_bytes(b[..4].try_into().unwrap());
                b = &b[4..];
                Field::Fixed32(v)
            }
            t => panic!("wire type {t}"),
        };
        fields.push((key >> 3, value));
    }
    fields
}

/// `--report-to tensorboard`: OUTPUT_DIR/runs holds one event file whose TFRecords have valid
/// checksums; the first event names the file version and every logged step is an event with that
/// step and the step's loss, learning rate and grad norm as scalars (read back with a wire-format
/// parser written here, not with the writer's encoder).
#[test]
fn report_to_tensorboard_writes_the_logged_scalars() {
    use trainer::tensorboard::masked_crc32c;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let args = Args::try_parse_from(["trainer", "--max-steps", "3", "--report-to", "tensorboard", "--output-dir", out.to_str().unwrap()]).unwrap();
    train::<B>(&args, &Default::default()).unwrap();
    let files: Vec<_> = std::fs::read_dir(out.join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
    let bytes = std::fs::read(&files[0]).unwrap();

    let mut events = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(rest[8..12].try_into().unwrap()), masked_crc32c(&rest[..8]), "length checksum");
        let payload = &rest[12..12 + len];
        assert_eq!(u32::from_le_bytes(rest[12 + len..16 + len].try_into().unwrap()), masked_crc32c(payload), "payload checksum");
        events.push(parse_message(payload));
        rest = &rest[16 + len..];
    }
    assert_eq!(events.len(), 4, "file version + 3 steps");
    assert!(matches!(&events[0][1], (3, Field::Bytes(v)) if v == b"brain.Event:2"), "{:?}", events[0]);

    let (losses, lrs, norms) = (read_losses(&out), read_field(&out, "learning_rate"), read_field(&out, "grad_norm"));
    for (i, event) in events[1..].iter().enumerate() {
        assert!(matches!(event[0], (1, Field::Fixed64(t)) if f64::from_bits(t) > 1.6e9), "wall time");
        let step = event.iter().find_map(|(n, f)| match (n, f) { (2, Field::Int(s)) => Some(*s), _ => None }).unwrap();
        assert_eq!(step, losses[i].0);
        let Some((5, Field::Bytes(summary))) = event.iter().find(|(n, _)| *n == 5) else { panic!("no summary in {event:?}") };
        let scalars: std::collections::BTreeMap<String, f32> = parse_message(summary)
            .into_iter()
            .map(|(_, value)| {
                let Field::Bytes(value) = value else { panic!("summary value") };
                let v = parse_message(&value);
                let (Field::Bytes(tag), Field::Fixed32(x)) = (&v[0].1, &v[1].1) else { panic!("{v:?}") };
                (String::from_utf8(tag.clone()).unwrap(), f32::from_bits(*x))
            })
            .collect();
        assert_eq!(scalars["train/loss"], losses[i].1 as f32, "step {step}");
        assert_eq!(scalars["train/learning_rate"], lrs[i].1 as f32, "step {step}");
        assert_eq!(scalars["train/grad_norm"], norms[i].1 as f32, "step {step}");
    }
}

/// The weights a run saved at its last step (`checkpoint-<steps>/model.safetensors`), in visiting order.
fn saved_weights(out: &std::path::Path, steps: usize) -> Vec<Vec<f32>> {
    let ckpt = mixtral_burn::HfCheckpoint::open(out.join(format!("checkpoint-{steps}"))).unwrap();
    let model = ckpt.load_model::<burn::backend::NdArray<f32>>(&Default::default(), burn_moe_backend::MoeKernel::Reference).unwrap();
    weights_of(&model)
}

fn weights_of(model: &mixtral_burn::MixtralForCausalLM<burn::backend::NdArray<f32>>) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor<burn::backend::NdArray<f32>> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<burn::tensor::Tensor<burn::backend::NdArray<f32>, D>>) {
            self.0.push(p.val().into_data().to_vec::<f32>().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    burn::module::Module::visit(model, &mut c);
    c.0
}

/// The AdamW flags reach the update, end to end (one step from the same seeded weights, constant lr):
/// `--weight-decay w` (decoupled, as torch's AdamW) moves every weight by exactly `-lr·w·θ0` more than
/// without it; `--adam-epsilon` huge makes the first step vanish (`g / (|g| + eps)`); `--adam-beta1` and
/// `--max-grad-norm` change the second step (the first Adam step does not depend on them).
#[test]
fn optimizer_flags_reach_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let lr = 0.01;
    let run = |name: &str, steps: usize, extra: &[&str]| -> Vec<Vec<f32>> {
        let out = dir.path().join(name);
        let steps_s = steps.to_string();
        let mut argv = vec![
            "trainer", "--seed", "3", "--max-steps", &steps_s, "--per-device-train-batch-size", "4", "--learning-rate", "0.01",
            "--lr-scheduler-type", "constant", "--save-strategy", "steps", "--save-steps", &steps_s,
        ];
        argv.extend_from_slice(extra);
        let out_s = out.to_str().unwrap().to_owned();
        argv.extend_from_slice(&["--output-dir", &out_s]);
        train::<B>(&Args::try_parse_from(argv).unwrap(), &Default::default()).unwrap();
        saved_weights(&out, steps)
    };
    let init = weights_of(&mixtral_burn::MixtralConfig::tiny().init_seeded(&Default::default(), 3));
    let plain = run("plain", 1, &["--weight-decay", "0", "--max-grad-norm", "0"]);
    let decayed = run("decayed", 1, &["--weight-decay", "0.5", "--max-grad-norm", "0"]);
    let huge_eps = run("eps", 1, &["--weight-decay", "0", "--max-grad-norm", "0", "--adam-epsilon", "1e6"]);
    let (mut worst_decay, mut worst_eps, mut moved) = (0f32, 0f32, Vec::new());
    for ((t0, (a, b)), c) in init.iter().zip(plain.iter().zip(&decayed)).zip(&huge_eps) {
        for i in 0..t0.len() {
            worst_decay = worst_decay.max(((a[i] - b[i]) - lr * 0.5 * t0[i]).abs());
            worst_eps = worst_eps.max((c[i] - t0[i]).abs());
            moved.push((a[i] - t0[i]).abs());
        }
    }
    moved.sort_by(f32::total_cmp);
    let median = moved[moved.len() / 2];
    assert!(median > 0.5 * lr, "one plain AdamW step should move a typical weight by about lr: median {median}");
    assert!(worst_decay < 1e-6, "weight decay: (θ_plain − θ_decayed) − lr·w·θ0 reaches {worst_decay}");
    assert!(worst_eps < 1e-3 * lr, "eps 1e6: a weight moved by {worst_eps}");
    // Second steps: β1 and clipping now matter.
    let two = run("two", 2, &[]);
    let max_diff = |x: &[Vec<f32>], y: &[Vec<f32>]| x.iter().flatten().zip(y.iter().flatten()).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    for (what, extra) in [("--adam-beta1 0.5", ["--adam-beta1", "0.5"]), ("--max-grad-norm 1e-3", ["--max-grad-norm", "1e-3"])] {
        let other = run(what, 2, &extra);
        let d = max_diff(&two, &other);
        assert!(d > 1e-3 * lr, "{what} did not change the second step (max difference {d})");
    }
}
