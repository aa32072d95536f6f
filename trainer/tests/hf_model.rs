//! `--model-path`: an HF Mixtral directory (config.json + model.safetensors written by mixtral-burn's
//! `save_hf`) with a `tokenizer.json` built here with the `tokenizers` API.

use std::path::Path;

use clap::Parser;
use mixtral_burn::checkpoint::{HfLayout, SaveDtype, save_hf};
use mixtral_burn::{MixtralConfig, MixtralForCausalLM};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer as HfTok};
use trainer::train::{TrainError, train};
use trainer::{Args, HfTokenizer, IGNORE_INDEX, PromptStyle, Tokenizer, TokenizerError, build_example};

type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

const WORDS: &[&str] = &[
    "[UNK]", "<s>", "</s>", "###", "Instruction", "Response", ":", "add", "one", "two", "three", "four", "five",
    "six", "seven", "eight", "nine", "ten",
];
const MODEL_VOCAB: usize = 24;

/// A WordLevel tokenizer over [`WORDS`] whose post-processor, like Llama's, prepends `<s>` when asked
/// for special tokens.
fn write_tokenizer(path: &Path) {
    let vocab_path = path.with_file_name("vocab.json");
    let vocab: serde_json::Map<String, serde_json::Value> =
        WORDS.iter().enumerate().map(|(i, w)| ((*w).to_owned(), serde_json::Value::from(i))).collect();
    std::fs::write(&vocab_path, serde_json::Value::Object(vocab).to_string()).unwrap();
    let model = WordLevel::from_file(vocab_path.to_str().unwrap(), "[UNK]".into()).unwrap();
    let mut tok = HfTok::new(model);
    tok.with_pre_tokenizer(Some(Whitespace));
    tok.with_post_processor(Some(
        TemplateProcessing::builder().try_single("<s> $A").unwrap().special_tokens(vec![("<s>", 1)]).build().unwrap(),
    ));
    tok.add_special_tokens(&[AddedToken::from("<s>", true), AddedToken::from("</s>", true)]);
    tok.save(path, false).unwrap();
    std::fs::remove_file(vocab_path).unwrap();
}

fn tiny_config() -> MixtralConfig {
    MixtralConfig::new(MODEL_VOCAB, 32, 64, 2, 4, 2, 4, 2)
        .with_max_position_embeddings(64)
        .with_rope_theta(10000.0)
        .with_bos_token_id(Some(1))
        .with_eos_token_id(Some(2))
}

fn write_model_dir(dir: &Path, config: &MixtralConfig) {
    let model: MixtralForCausalLM<burn::backend::NdArray<f32>> = config.init_seeded(&Default::default(), 5);
    save_hf(&model, config, dir, HfLayout::Classic, SaveDtype::F32).unwrap();
    write_tokenizer(&dir.join("tokenizer.json"));
}

const NUMS: &[&str] = &["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"];

fn write_data(path: &Path) {
    // "add a b" -> the word for a + b, for sums up to ten.
    let mut recs = Vec::new();
    for a in 1..=5 {
        for b in 1..=5 {
            if a + b <= 10 {
                recs.push(serde_json::json!({
                    "instruction": "add", "input": format!("{} {}", NUMS[a - 1], NUMS[b - 1]), "output": NUMS[a + b - 1]
                }));
            }
        }
    }
    std::fs::write(path, serde_json::Value::Array(recs).to_string()).unwrap();
}

#[test]
fn hf_tokenizer_encodes_decodes_and_adds_one_bos() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    write_tokenizer(&path);
    let tok = Tokenizer::Hf(HfTokenizer::from_file(&path, MODEL_VOCAB, Some(1), Some(2)).unwrap());
    assert_eq!(tok.encode("add one two").unwrap(), vec![7, 8, 9]);
    assert_eq!(tok.encode("add zebra").unwrap(), vec![7, 0]);
    assert_eq!(tok.decode(&[1, 7, 8, 9, 2]).unwrap(), "add one two");
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.vocab_size()), (1, 2, 2, MODEL_VOCAB));

    // The tokenizer's own post-processor would prepend <s>; the data pipeline adds exactly one.
    let rec = trainer::AlpacaRecord { instruction: "add".into(), input: "one two".into(), output: "three".into() };
    let e = build_example(&tok, &rec, PromptStyle::Compact, 64).unwrap();
    // BOS ### Instruction : add one two ### Response : three EOS
    assert_eq!(e.input_ids, vec![1, 3, 4, 6, 7, 8, 9, 3, 5, 6, 10, 2]);
    assert_eq!(e.input_ids.iter().filter(|&&t| t == 1).count(), 1);
    let mut labels = vec![IGNORE_INDEX; 10];
    labels.extend([10, 2]);
    assert_eq!(e.labels, labels);

    // Without ids in config.json, BOS/EOS come from the tokenizer's special tokens.
    let t = HfTokenizer::from_file(&path, MODEL_VOCAB, None, None).unwrap();
    let t = Tokenizer::Hf(t);
    assert_eq!((t.bos_id(), t.eos_id()), (1, 2));
}

#[test]
fn hf_tokenizer_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tokenizer.json");
    let err = HfTokenizer::from_file(&path, MODEL_VOCAB, Some(1), Some(2)).unwrap_err();
    assert!(matches!(err, TokenizerError::Io { .. }) && err.to_string().contains("tokenizer.json"), "{err}");

    std::fs::write(&path, "{\"model\": ").unwrap();
    let err = HfTokenizer::from_file(&path, MODEL_VOCAB, Some(1), Some(2)).unwrap_err();
    assert!(matches!(err, TokenizerError::Parse { .. }) && err.to_string().contains("tokenizer.json"), "{err}");

    write_tokenizer(&path);
    let err = HfTokenizer::from_file(&path, 10, Some(1), Some(2)).unwrap_err();
    assert!(matches!(err, TokenizerError::VocabTooLarge { tokenizer_vocab: 18, model_vocab: 10, .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json") && err.to_string().contains("18"), "{err}");

    let err = HfTokenizer::from_file(&path, MODEL_VOCAB, Some(30), Some(2)).unwrap_err();
    assert!(matches!(err, TokenizerError::SpecialOutOfVocab { which: "bos", id: 30, .. }), "{err}");
}

#[test]
fn trains_from_model_path_and_loss_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    let config = tiny_config();
    write_model_dir(&model_dir, &config);
    let data = tmp.path().join("data.json");
    write_data(&data);
    let out = tmp.path().join("out");
    let args = Args::try_parse_from([
        "trainer", "--model-path", model_dir.to_str().unwrap(), "--data-path", data.to_str().unwrap(),
        "--max-steps", "20", "--per-device-train-batch-size", "8", "--learning-rate", "1e-2",
        "--output-dir", out.to_str().unwrap(), "--save-strategy", "steps", "--save-steps", "20",
    ])
    .unwrap();
    let summary = train::<B>(&args, &Default::default()).unwrap();
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 20);
    // Random init over 24 tokens starts near ln(24) = 3.18.
    assert!((losses[0] - (MODEL_VOCAB as f64).ln()).abs() < 0.5, "first loss {}", losses[0]);
    let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = losses[16..].iter().sum::<f64>() / 4.0;
    assert!(last < first - 0.5, "loss did not fall: first 4 mean {first:.3}, last 4 mean {last:.3}");
    assert!(summary.train_loss.is_finite());
    // The checkpoint is a complete HF directory again, tokenizer included.
    let ckpt = out.join("checkpoint-20");
    assert_eq!(std::fs::read(ckpt.join("tokenizer.json")).unwrap(), std::fs::read(model_dir.join("tokenizer.json")).unwrap());
    let reopened = mixtral_burn::HfCheckpoint::open(&ckpt).unwrap();
    assert_eq!(reopened.config.vocab_size, MODEL_VOCAB);
}

/// Expert parallelism from `--model-path`: each of 2 in-process ranks reads only its 2 of the 4
/// experts from the files (`HfCheckpoint::load_model_with_experts`), and the run logs the same
/// losses as one rank holding the whole model (global batch 8 either way).
#[test]
fn expert_parallel_ranks_load_their_experts_and_train_like_one_rank() {
    use burn_moe_backend::dist::{CommConfig, ThreadComm};
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_model_dir(&model_dir, &tiny_config());
    let data = tmp.path().join("data.json");
    write_data(&data);
    let flags = |out: &Path, batch: &str, more: &[&str]| {
        let mut v = vec![
            "trainer", "--model-path", model_dir.to_str().unwrap(), "--data-path", data.to_str().unwrap(), "--max-steps", "3",
            "--per-device-train-batch-size", batch, "--learning-rate", "1e-2", "--output-dir", out.to_str().unwrap(),
        ];
        v.extend_from_slice(more);
        Args::try_parse_from(v).unwrap()
    };
    let losses = |out: &Path| -> Vec<f64> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect()
    };
    let single = tmp.path().join("single");
    train::<B>(&flags(&single, "8", &[]), &Default::default()).unwrap();
    for plan in [&["--ep-size", "2", "--sharding", "fsdp2"][..], &["--ep-size", "2", "--sharding", "ddp"]] {
        let out = tmp.path().join(plan.join(""));
        let args = flags(&out, "4", plan);
        let results = ThreadComm::<burn::backend::NdArray<f32>>::run_ranks(2, CommConfig::default(), |comm| {
            trainer::train::train_with::<B, _>(&args, &Default::default(), &comm).map(|_| ()).map_err(|e| e.to_string())
        });
        for (rank, r) in results.into_iter().enumerate() {
            r.unwrap_or_else(|e| panic!("rank {rank} panicked: {e}")).unwrap_or_else(|e| panic!("{plan:?} rank {rank}: {e}"));
        }
        let (a, b) = (losses(&single), losses(&out));
        assert_eq!(a.len(), b.len(), "{plan:?}");
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{plan:?} step {}: one rank {x} vs EP {y}", step + 1);
        }
    }
}

#[test]
fn model_path_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_model_dir(&model_dir, &tiny_config());
    let run = || {
        let args = Args::try_parse_from([
            "trainer", "--model-path", model_dir.to_str().unwrap(), "--max-steps", "1",
            "--output-dir", tmp.path().join("out").to_str().unwrap(),
        ])
        .unwrap();
        train::<B>(&args, &Default::default()).unwrap_err()
    };
    std::fs::remove_file(model_dir.join("tokenizer.json")).unwrap();
    let err = run();
    assert!(matches!(err, TrainError::Tokenizer(TokenizerError::Io { .. })), "{err}");
    assert!(err.to_string().contains("model/tokenizer.json"), "{err}");

    // A model whose vocabulary is smaller than the tokenizer's.
    let small = tiny_config();
    let small = MixtralConfig { vocab_size: 12, ..small };
    let small_dir = tmp.path().join("small");
    write_model_dir(&small_dir, &small);
    let args = Args::try_parse_from([
        "trainer", "--model-path", small_dir.to_str().unwrap(), "--output-dir", tmp.path().join("out").to_str().unwrap(),
    ])
    .unwrap();
    let err = train::<B>(&args, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("small/tokenizer.json") && err.to_string().contains("vocab_size is 12"), "{err}");

    std::fs::remove_file(model_dir.join("config.json")).unwrap();
    let err = run();
    assert!(err.to_string().contains("config.json"), "{err}");
}
