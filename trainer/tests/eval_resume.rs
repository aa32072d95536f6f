//! Evaluation loss against a hand computation, and save/resume reproducing an uninterrupted run.

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use clap::Parser;
use mixtral_burn::{HfCheckpoint, MixtralForCausalLM};
use trainer::train::{TrainError, train};
use trainer::{Args, IGNORE_INDEX, PromptStyle, Tokenizer, TrainDataset, load_records};

type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
type Inner = burn::backend::NdArray<f32>;

fn args(extra: &[&str]) -> Args {
    Args::try_parse_from(std::iter::once("trainer").chain(extra.iter().copied())).unwrap()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const EVAL_SET: &str = r#"[
 {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"},
 {"instruction": "Repeat the word.", "input": "cat", "output": "cat cat"},
 {"instruction": "Say hello.", "output": "Hello!"},
 {"instruction": "Reverse the letters.", "input": "abc", "output": "cba"},
 {"instruction": "Count to three.", "output": "1 2 3"}
]"#;

/// Mean next-token cross-entropy over the eval set, one example at a time (no padding), in f64 from
/// the logits.
fn eval_by_hand(model: &MixtralForCausalLM<Inner>, path: &Path) -> f64 {
    let records = load_records(Some(path)).unwrap();
    let ds = TrainDataset::new(&records, PromptStyle::Compact, 128, &Tokenizer::default()).unwrap();
    let (mut sum, mut n) = (0.0f64, 0usize);
    for e in ds.examples() {
        let s = e.len();
        let ids: Vec<i64> = e.input_ids.iter().map(|&x| i64::from(x)).collect();
        let logits = model
            .forward(Tensor::<Inner, 2, Int>::from_data(TensorData::new(ids, [1, s]), &Default::default()))
            .logits;
        let v = logits.dims()[2];
        let logits: Vec<f64> = logits.into_data().iter::<f64>().collect();
        for t in 0..s - 1 {
            let label = e.labels[t + 1];
            if label == IGNORE_INDEX {
                continue;
            }
            let row = &logits[t * v..(t + 1) * v];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            sum += lse - row[label as usize];
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn eval_loss_matches_a_forward_by_hand() {
    let tmp = tempfile::tempdir().unwrap();
    let eval_path = tmp.path().join("eval.json");
    std::fs::write(&eval_path, EVAL_SET).unwrap();
    let out = tmp.path().join("out");
    let summary = train::<B>(
        &args(&[
            "--max-steps", "4", "--logging-steps", "4", "--output-dir", out.to_str().unwrap(),
            "--eval-data-path", eval_path.to_str().unwrap(), "--evaluation-strategy", "steps", "--eval-steps", "2",
            "--per-device-eval-batch-size", "3", "--save-strategy", "steps", "--save-steps", "2",
        ]),
        &Default::default(),
    )
    .unwrap();
    let lines = metrics(&out);
    // Logged at the eval steps 2 and 4 (logging every 4 would only give step 4).
    assert_eq!(lines.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 4]);
    for (line, step) in lines.iter().zip([2, 4]) {
        let model: MixtralForCausalLM<Inner> = HfCheckpoint::open(out.join(format!("checkpoint-{step}")))
            .unwrap()
            .load_model(&Default::default(), Default::default())
            .unwrap();
        let expected = eval_by_hand(&model, &eval_path);
        let got = line["eval_loss"].as_f64().unwrap();
        assert!((got - expected).abs() <= 1e-5 * expected, "step {step}: eval_loss {got} vs by hand {expected}");
    }
    assert!(lines[1]["eval_loss"].as_f64().unwrap() < lines[0]["eval_loss"].as_f64().unwrap());
    assert_eq!(summary.eval_loss, lines[1]["eval_loss"].as_f64());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap()).unwrap();
    assert_eq!(json["eval_loss"].as_f64(), summary.eval_loss);

    // Asking for evaluation without a set is an error, not a silent no-op.
    let err = train::<B>(&args(&["--evaluation-strategy", "epoch"]), &Default::default()).unwrap_err();
    assert!(matches!(err, TrainError::Args(_)), "{err}");
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let common = |out: &Path, steps: &str| {
        vec![
            "--max-steps".to_owned(), steps.to_owned(), "--per-device-train-batch-size".into(), "4".into(),
            "--gradient-accumulation-steps".into(), "2".into(), "--lr-scheduler-type".into(), "constant".into(),
            "--weight-decay".into(), "0.01".into(), "--save-strategy".into(), "steps".into(), "--save-steps".into(),
            "3".into(), "--output-dir".into(), out.to_str().unwrap().to_owned(),
        ]
    };
    let run = |v: Vec<String>| {
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        train::<B>(&args(&v), &Default::default())
    };
    let full = tmp.path().join("full");
    run(common(&full, "6")).unwrap();
    let part = tmp.path().join("part");
    run(common(&part, "3")).unwrap();
    let mut resumed = common(&part, "6");
    resumed.extend(["--resume-from-checkpoint".into(), "latest".into()]);
    run(resumed).unwrap();

    let (a, b) = (metrics(&full), metrics(&part));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        for key in ["step", "loss", "lm_loss", "aux_loss", "grad_norm", "learning_rate", "epoch"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            // Weights (f32 safetensors) and AdamW moments (full-precision record) round-trip exactly,
            // and the CPU kernels are deterministic, so the curves agree bit for bit.
            assert_eq!(p.to_bits(), q.to_bits(), "step {}: {key} {p} (uninterrupted) vs {q} (resumed)", x["step"]);
        }
    }
    // Final weights agree, tensor by tensor.
    let wa = std::fs::read(full.join("checkpoint-6/model.safetensors")).unwrap();
    let wb = std::fs::read(part.join("checkpoint-6/model.safetensors")).unwrap();
    let (ta, tb) = (safetensors::SafeTensors::deserialize(&wa).unwrap(), safetensors::SafeTensors::deserialize(&wb).unwrap());
    assert_eq!(ta.len(), tb.len());
    for (name, va) in ta.tensors() {
        let vb = tb.tensor(&name).unwrap();
        let fa = va.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
        let fb = vb.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
        for (p, q) in fa.zip(fb) {
            assert_eq!(p.to_bits(), q.to_bits(), "{name}: {p} vs {q}");
        }
    }

    // Broken checkpoints: each error names the file at fault.
    let broken = |name: &str, damage: &dyn Fn(&Path)| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let ckpt = dir.join("checkpoint-3");
        std::fs::create_dir_all(&ckpt).unwrap();
        for f in std::fs::read_dir(full.join("checkpoint-3")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), ckpt.join(f.file_name())).unwrap();
        }
        damage(&ckpt);
        let mut v = common(&dir, "6");
        v.extend(["--resume-from-checkpoint".into(), ckpt.to_str().unwrap().to_owned()]);
        run(v).unwrap_err().to_string()
    };
    let e = broken("no_optim", &|c| std::fs::remove_file(c.join("optimizer.mpk")).unwrap());
    assert!(e.contains("checkpoint-3/optimizer.mpk"), "{e}");
    let e = broken("bad_optim", &|c| std::fs::write(c.join("optimizer.mpk"), b"\x93garbage").unwrap());
    assert!(e.contains("checkpoint-3/optimizer.mpk"), "{e}");
    let e = broken("bad_state", &|c| std::fs::write(c.join("trainer_state.json"), "{").unwrap());
    assert!(e.contains("checkpoint-3/trainer_state.json"), "{e}");
    let e = broken("bad_weights", &|c| {
        let w = c.join("model.safetensors");
        let bytes = std::fs::read(&w).unwrap();
        std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert!(e.contains("checkpoint-3/model.safetensors"), "{e}");

    // Flags that change the data order are refused.
    let mut v = common(&part, "6");
    v.extend(["--resume-from-checkpoint".into(), "latest".into(), "--seed".into(), "7".into()]);
    let e = run(v).unwrap_err().to_string();
    assert!(e.contains("checkpoint-6/trainer_state.json") && e.contains("seed was 42, this run has 7"), "{e}");
}

#[test]
fn epoch_strategies_evaluate_and_save_at_epoch_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("train.json");
    // 5 examples, batch 2: 3 micro-batches per epoch; accumulation 2 puts epoch ends in steps 2 and 3
    // (micro-batches 3 and 6) of 1..=4.
    let recs: Vec<serde_json::Value> = (0..5)
        .map(|i| serde_json::json!({"instruction": "Echo.", "input": i.to_string(), "output": i.to_string()}))
        .collect();
    std::fs::write(&data, serde_json::Value::Array(recs).to_string()).unwrap();
    let eval_path = tmp.path().join("eval.json");
    std::fs::write(&eval_path, EVAL_SET).unwrap();
    let out = tmp.path().join("out");
    train::<B>(
        &args(&[
            "--data-path", data.to_str().unwrap(), "--max-steps", "4", "--per-device-train-batch-size", "2",
            "--gradient-accumulation-steps", "2", "--logging-steps", "10", "--output-dir", out.to_str().unwrap(),
            "--eval-data-path", eval_path.to_str().unwrap(), "--evaluation-strategy", "epoch",
            "--save-strategy", "epoch", "--save-total-limit", "1",
        ]),
        &Default::default(),
    )
    .unwrap();
    let lines = metrics(&out);
    let evals: Vec<u64> = lines.iter().filter(|l| l["eval_loss"].is_number()).map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(evals, vec![2, 3]);
    // Step 4 is logged as the last step; epoch is fractional (8 micro-batches / 3 per epoch).
    assert_eq!(lines.last().unwrap()["step"], 4);
    assert!((lines.last().unwrap()["epoch"].as_f64().unwrap() - 8.0 / 3.0).abs() < 1e-12);
    // Checkpoints at 2 and 3; the limit of 1 keeps only the newest.
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(left, vec!["checkpoint-3".to_owned()]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-3/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["global_step"], 3);
    assert_eq!(state["micro_batches_seen"], 6);
    assert_eq!(state["epoch"], 2.0);
    assert_eq!(state["log_history"].as_array().unwrap().len(), 2);
}

/// LoRA runs resume too: checkpoints carry the adapters in PEFT's format next to the frozen base, and
/// the adapter dropout (default 0.05) is seeded per step, so an interrupted and resumed run logs the
/// uninterrupted run's losses bit for bit — adapters on every projection, scatter path.
#[test]
fn lora_runs_resume_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let common = |out: &Path, steps: &str| {
        let out = out.to_str().unwrap().to_owned();
        [
            "--max-steps", steps, "--per-device-train-batch-size", "4", "--lr-scheduler-type", "constant", "--learning-rate",
            "1e-2", "--use-lora", "all", "--moe-kernel", "scatter", "--save-strategy", "steps", "--save-steps", "2",
            "--output-dir",
        ]
        .into_iter()
        .map(str::to_owned)
        .chain([out])
        .collect::<Vec<_>>()
    };
    let run = |v: Vec<String>| {
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        train::<B>(&args(&v), &Default::default()).unwrap();
    };
    let full = tmp.path().join("full");
    run(common(&full, "4"));
    let part = tmp.path().join("part");
    run(common(&part, "2"));
    for f in ["adapter_model.safetensors", "adapter_config.json", "model.safetensors", "optimizer.mpk"] {
        assert!(part.join("checkpoint-2").join(f).is_file(), "{f}");
    }
    let mut resumed = common(&part, "4");
    resumed.extend(["--resume-from-checkpoint".into(), "latest".into()]);
    run(resumed);
    let (a, b) = (metrics(&full), metrics(&part));
    assert_eq!((a.len(), b.len()), (4, 4));
    for (x, y) in a.iter().zip(&b) {
        for key in ["loss", "grad_norm"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert_eq!(p.to_bits(), q.to_bits(), "step {}: {key} {p} (uninterrupted) vs {q} (resumed)", x["step"]);
        }
    }
}
