//! The HF checkpoint loader on corrupt input (every failure is a precise [`CheckpointError`] whose
//! message names the file, tensor and numbers) and checkpoint round trips (load → save → load is
//! bit-exact in every layout and dtype; the fused export reproduces transformers' own file).
//!
//! Every corruption is applied to a copy of a fixture in a temporary directory; `tests/fixtures` is
//! never modified.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use burn_moe_backend::MoeKernel;
use burn_moe_tests::{Cpu, fixture_cases, fixtures_dir, read_f32_tensors};
use mixtral_burn::checkpoint::{FetchValue, SaveDtype, hf_tensors, save_hf, save_hf_classic};
use mixtral_burn::parity::read_input_ids;
use mixtral_burn::{CheckpointError, ConfigError, HfCheckpoint, HfLayout, MixtralForCausalLM};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Copies `tests/fixtures/<case>/model` into a fresh temporary directory; returns the directory
/// (kept alive by the `TempDir`) and the path of the copied `model` folder.
fn copy_fixture(case: &str) -> (TempDir, PathBuf) {
    let tmp = TempDir::new().expect("temp dir");
    let dst = tmp.path().join("model");
    copy_dir(&fixtures_dir().join(case).join("model"), &dst);
    (tmp, dst)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// One tensor of a safetensors file, undecoded.
#[derive(Debug, Clone, PartialEq)]
struct RawTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl RawTensor {
    fn f32(shape: &[usize], values: &[f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        Self { dtype: Dtype::F32, shape: shape.to_vec(), bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => self.bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::BF16 => {
                self.bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            Dtype::F16 => self.bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => panic!("unexpected dtype {other:?}"),
        }
    }
}

/// Every tensor of a safetensors file, undecoded, plus its `__metadata__`.
fn read_raw(path: &Path) -> (BTreeMap<String, RawTensor>, Option<HashMap<String, String>>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (name, RawTensor { dtype: view.dtype(), shape: view.shape().to_vec(), bytes: view.data().to_vec() })
        })
        .collect();
    (tensors, metadata.metadata().clone())
}

/// All tensors of all safetensors files of a checkpoint directory (names are unique across shards).
fn read_raw_dir(dir: &Path) -> BTreeMap<String, RawTensor> {
    let mut all = BTreeMap::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    for path in paths {
        for (name, t) in read_raw(&path).0 {
            assert!(all.insert(name.clone(), t).is_none(), "{name} appears twice in {}", dir.display());
        }
    }
    all
}

fn write_raw(path: &Path, tensors: &BTreeMap<String, RawTensor>, metadata: Option<HashMap<String, String>>) {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes).expect("valid tensor")))
        .collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
}

/// Reads a safetensors file, lets `edit` change its tensors, and writes it back in place.
fn rewrite(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, RawTensor>)) {
    let (mut tensors, metadata) = read_raw(path);
    edit(&mut tensors);
    write_raw(path, &tensors, metadata);
}

fn open(dir: &Path) -> HfCheckpoint {
    HfCheckpoint::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn open_err(dir: &Path) -> CheckpointError {
    match HfCheckpoint::open(dir) {
        Ok(_) => panic!("{} opened, expected an error", dir.display()),
        Err(e) => e,
    }
}

fn load(checkpoint: &HfCheckpoint) -> MixtralForCausalLM<Cpu> {
    checkpoint
        .load_model::<Cpu>(&Default::default(), MoeKernel::Reference)
        .unwrap_or_else(|e| panic!("{}: {e}", checkpoint.dir.display()))
}

/// Opens (must succeed: these corruptions are only visible when the weights are read) and loads.
fn load_err(dir: &Path) -> CheckpointError {
    match open(dir).load_model::<Cpu>(&Default::default(), MoeKernel::Reference) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_mentions(err: &CheckpointError, parts: &[&str]) {
    let msg = err.to_string();
    for part in parts {
        assert!(msg.contains(part), "error message does not mention {part:?}:\n  {msg}\n  ({err:?})");
    }
}

fn s(path: &Path) -> String {
    path.display().to_string()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// `hf_tensors` values of a model in the given layout, as (name, shape, values).
fn model_tensors(model: &MixtralForCausalLM<Cpu>, layout: HfLayout) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    hf_tensors(model, layout, &mut FetchValue)
        .into_iter()
        .map(|(name, data)| {
            let shape = data.shape.to_vec();
            (name, shape, data.iter::<f32>().collect())
        })
        .collect()
}

fn logits(model: &MixtralForCausalLM<Cpu>, vocab: usize) -> (Vec<usize>, Vec<f32>) {
    let ids: Vec<i64> = [1usize, 5, 17, 42, 3, 0, 2, 4, 8, 16, 31, 77].iter().map(|&i| (i % vocab) as i64).collect();
    let input = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [2, 6]), &Default::default());
    let out = model.forward(input).logits;
    let shape = out.dims().to_vec();
    (shape, out.into_data().iter::<f32>().collect())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const E4_K2_WEIGHTS: &str = "model.safetensors";

// ---------------------------------------------------------------------------------------------
// 1. config.json
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_config_is_a_config_io_error_naming_the_file() {
    let (_tmp, dir) = copy_fixture("e4_k2");
    let config = dir.join("config.json");
    std::fs::remove_file(&config).unwrap();
    let err = open_err(&dir);
    match &err {
        CheckpointError::Config(ConfigError::Io { path, source }) => {
            assert_eq!(path, &s(&config));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Config(Io), got {other:?}"),
    }
    assert_mentions(&err, &[&s(&config), "cannot read config"]);
}

#[test]
fn invalid_config_json_is_a_config_json_error_naming_the_file() {
    let (_tmp, dir) = copy_fixture("e4_k2");
    let config = dir.join("config.json");
    std::fs::write(&config, "{\"vocab_size\": 96, \"hidden_size\": ").unwrap();
    let err = open_err(&dir);
    assert!(matches!(&err, CheckpointError::Config(ConfigError::Json { path, .. }) if *path == s(&config)), "{err:?}");
    assert_mentions(&err, &[&s(&config), "invalid config"]);

    // Valid JSON, wrong type for a field: also ConfigError::Json.
    std::fs::write(&config, r#"{"vocab_size": "ninety-six"}"#).unwrap();
    let err = open_err(&dir);
    assert!(matches!(&err, CheckpointError::Config(ConfigError::Json { path, .. }) if *path == s(&config)), "{err:?}");
    assert_mentions(&err, &[&s(&config)]);
}

// ---------------------------------------------------------------------------------------------
// 2. No weights
// ---------------------------------------------------------------------------------------------

#[test]
fn directory_without_weights_is_no_weights_naming_the_dir() {
    let (_tmp, dir) = copy_fixture("e4_k2");
    std::fs::remove_file(dir.join(E4_K2_WEIGHTS)).unwrap();
    let err = open_err(&dir);
    assert!(matches!(&err, CheckpointError::NoWeights { dir: d } if *d == s(&dir)), "{err:?}");
    assert_mentions(&err, &[&s(&dir), "model.safetensors", "model.safetensors.index.json"]);
}

// ---------------------------------------------------------------------------------------------
// 3. Corrupt safetensors files
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_safetensors_is_a_safetensors_error_naming_the_file() {
    let (_tmp, dir) = copy_fixture("e4_k2");
    let weights = dir.join(E4_K2_WEIGHTS);
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let err = open_err(&dir);
    assert!(matches!(&err, CheckpointError::Safetensors { path, .. } if *path == s(&weights)), "{err:?}");
    assert_mentions(&err, &["invalid safetensors file", &s(&weights), "Incomplete"]);
}

#[test]
fn garbage_safetensors_header_is_a_safetensors_error_naming_the_file() {
    let (_tmp, dir) = copy_fixture("e4_k2");
    let weights = dir.join(E4_K2_WEIGHTS);
    let original = std::fs::read(&weights).unwrap();

    // Header length far beyond any sane header.
    let mut bytes = original.clone();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&weights, &bytes).unwrap();
    let err = open_err(&dir);
    assert!(matches!(&err, CheckpointError::Safetensors { path, .. } if *path == s(&weights)), "{err:?}");
    assert_mentions(&err, &[&s(&weights), "HeaderTooLarge"]);

    // Header length plausible but past the end of the file.
    let mut bytes = original.clone();
    bytes[..8].copy_from_slice(&(original.len() as u64 + 1000).to_le_bytes());
    std::fs::write(&weights, &bytes).unwrap();
    let err = open_err(&dir);
    assert!(matches!(&err, CheckpointError::Safetensors { path, .. } if *path == s(&weights)), "{err:?}");
    assert_mentions(&err, &[&s(&weights), "InvalidHeaderLength"]);

    // Header that is not JSON.
    let mut bytes = original.clone();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&weights, &bytes).unwrap();
    let err = open_err(&dir);
    assert!(matches!(&err, CheckpointError::Safetensors { path, .. } if *path == s(&weights)), "{err:?}");
    assert_mentions(&err, &[&s(&weights)]);

    // Shorter than the 8-byte length prefix, and empty.
    for len in [3, 0] {
        std::fs::write(&weights, &original[..len]).unwrap();
        let err = open_err(&dir);
        assert!(
            matches!(&err, CheckpointError::Safetensors { path, .. } if *path == s(&weights)),
            "len {len}: {err:?}"
        );
        assert_mentions(&err, &[&s(&weights), "HeaderTooSmall"]);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Shard index
// ---------------------------------------------------------------------------------------------

#[test]
fn index_naming_a_missing_shard_is_an_io_error_naming_the_shard() {
    let (_tmp, dir) = copy_fixture("sharded_bf16");
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.norm.weight"] = "model-00004-of-00003.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let missing = dir.join("model-00004-of-00003.safetensors");
    let err = open_err(&dir);
    match &err {
        CheckpointError::Io { path, source } => {
            assert_eq!(path, &s(&missing));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert_mentions(&err, &[&s(&missing)]);
}

#[test]
fn index_without_weight_map_is_an_index_error() {
    let (_tmp, dir) = copy_fixture("sharded_bf16");
    let index_path = dir.join("model.safetensors.index.json");
    let is_index_error =
        |err: &CheckpointError| matches!(err, CheckpointError::Index { path, .. } if *path == s(&index_path));

    std::fs::write(&index_path, r#"{"metadata": {"total_size": 99136}}"#).unwrap();
    let err = open_err(&dir);
    assert!(is_index_error(&err), "{err:?}");
    assert_mentions(&err, &["invalid shard index", &s(&index_path), "weight_map"]);

    // Not JSON at all.
    std::fs::write(&index_path, "{ not json").unwrap();
    let err = open_err(&dir);
    assert!(is_index_error(&err), "{err:?}");
    assert_mentions(&err, &[&s(&index_path)]);

    // A weight_map entry that is not a string.
    std::fs::write(&index_path, r#"{"weight_map": {"model.norm.weight": 3}}"#).unwrap();
    let err = open_err(&dir);
    assert!(is_index_error(&err), "{err:?}");
    assert_mentions(&err, &[&s(&index_path), "model.norm.weight"]);

    // A shard outside the directory.
    std::fs::write(&index_path, r#"{"weight_map": {"model.norm.weight": "../model.safetensors"}}"#).unwrap();
    let err = open_err(&dir);
    assert!(is_index_error(&err), "{err:?}");
    assert_mentions(&err, &[&s(&index_path), "model.norm.weight", "../model.safetensors"]);
}

#[test]
fn tensor_in_two_shards_is_a_duplicate_error_naming_both_files() {
    let (_tmp, dir) = copy_fixture("sharded_bf16");
    let first = dir.join("model-00001-of-00003.safetensors");
    let second = dir.join("model-00002-of-00003.safetensors");
    let (tensors, _) = read_raw(&first);
    let (name, tensor) = tensors.into_iter().next().unwrap();
    rewrite(&second, |t| {
        t.insert(name.clone(), tensor);
    });
    let err = open_err(&dir);
    assert!(
        matches!(&err, CheckpointError::Duplicate { name: n, first: a, second: b }
            if *n == name && *a == s(&first) && *b == s(&second)),
        "{err:?}"
    );
    assert_mentions(&err, &[&name, &s(&first), &s(&second)]);
}

// ---------------------------------------------------------------------------------------------
// 5-9. Tensor-level problems (seen by load_model)
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_tensor_is_named() {
    const NAME: &str = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
    let (_tmp, dir) = copy_fixture("e4_k2");
    rewrite(&dir.join(E4_K2_WEIGHTS), |t| {
        assert!(t.remove(NAME).is_some(), "fixture has {NAME}");
    });
    let err = load_err(&dir);
    assert!(
        matches!(&err, CheckpointError::MissingTensor { dir: d, name } if *d == s(&dir) && name == NAME),
        "{err:?}"
    );
    assert_mentions(&err, &[&s(&dir), NAME]);
}

#[test]
fn missing_fused_tensor_is_named() {
    const NAME: &str = "model.layers.1.mlp.experts.down_proj";
    let (_tmp, dir) = copy_fixture("fused");
    rewrite(&dir.join("model.safetensors"), |t| {
        assert!(t.remove(NAME).is_some(), "fixture has {NAME}");
    });
    let err = load_err(&dir);
    assert!(matches!(&err, CheckpointError::MissingTensor { name, .. } if name == NAME), "{err:?}");
    assert_mentions(&err, &[&s(&dir), NAME]);
}

#[test]
fn unexpected_tensor_is_listed() {
    const EXTRA: &str = "model.layers.0.extra.weight";
    let (_tmp, dir) = copy_fixture("e4_k2");
    rewrite(&dir.join(E4_K2_WEIGHTS), |t| {
        t.insert(EXTRA.to_string(), RawTensor::f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
    });
    let err = load_err(&dir);
    assert!(
        matches!(&err, CheckpointError::UnexpectedTensors { dir: d, names } if *d == s(&dir) && names == &[EXTRA]),
        "{err:?}"
    );
    assert_mentions(&err, &[&s(&dir), "1 tensor(s)", EXTRA]);
}

#[test]
fn misshaped_tensor_is_a_shape_error_with_both_shapes() {
    const NAME: &str = "model.layers.0.self_attn.q_proj.weight";
    let (_tmp, dir) = copy_fixture("e4_k2");
    let weights = dir.join(E4_K2_WEIGHTS);
    rewrite(&weights, |t| {
        let values: Vec<f32> = (0..15).map(|i| i as f32).collect();
        t.insert(NAME.to_string(), RawTensor::f32(&[3, 5], &values));
    });
    let err = load_err(&dir);
    match &err {
        CheckpointError::Shape { name, file, expected, found } => {
            assert_eq!(name, NAME);
            assert_eq!(file, &s(&weights));
            // num_attention_heads 4 × head_dim 8 = 32 rows, hidden_size 32 columns.
            assert_eq!(expected, &[32, 32]);
            assert_eq!(found, &[3, 5]);
        }
        other => panic!("expected Shape, got {other:?}"),
    }
    assert_mentions(&err, &[NAME, &s(&weights), "[3, 5]", "[32, 32]"]);
}

#[test]
fn misshaped_tensor_in_a_shard_names_the_shard() {
    const NAME: &str = "model.layers.1.block_sparse_moe.gate.weight";
    let (_tmp, dir) = copy_fixture("sharded_bf16");
    let shard = dir.join(open(&dir).files.file_of(NAME).expect("fixture has the router").file_name().unwrap());
    rewrite(&shard, |t| {
        let old = t.get_mut(NAME).unwrap();
        assert_eq!(old.shape, vec![4, 32]);
        old.shape = vec![2, 64]; // same byte count, different shape
    });
    let err = load_err(&dir);
    assert!(
        matches!(&err, CheckpointError::Shape { name, file, expected, found }
            if name == NAME && *file == s(&shard) && expected == &[4, 32] && found == &[2, 64]),
        "{err:?}"
    );
    assert_mentions(&err, &[NAME, &s(&shard), "[2, 64]", "[4, 32]"]);
}

#[test]
fn unsupported_dtype_is_a_dtype_error_naming_the_tensor() {
    let cases: [(&str, Dtype, usize, &str); 3] = [
        ("model.layers.0.self_attn.q_proj.weight", Dtype::F64, 8, "F64"),
        ("model.layers.1.block_sparse_moe.experts.3.w2.weight", Dtype::I32, 4, "I32"),
        ("model.norm.weight", Dtype::F64, 8, "F64"),
    ];
    for (name, dtype, width, dtype_name) in cases {
        let (_tmp, dir) = copy_fixture("e4_k2");
        let weights = dir.join(E4_K2_WEIGHTS);
        rewrite(&weights, |t| {
            let old = t.get_mut(name).unwrap();
            let n: usize = old.shape.iter().product();
            old.dtype = dtype;
            old.bytes = vec![0u8; n * width];
        });
        let err = load_err(&dir);
        assert!(
            matches!(&err, CheckpointError::Dtype { name: n, file, dtype: d } if n == name && *file == s(&weights) && d == dtype_name),
            "{name}: {err:?}"
        );
        assert_mentions(&err, &[name, &s(&weights), dtype_name, "F32, BF16, F16"]);
    }
}

#[test]
fn config_inconsistent_with_weights_is_a_shape_error() {
    let (_tmp, dir) = copy_fixture("e4_k2");
    edit_config(&dir, |c| c["hidden_size"] = 48.into());
    let weights = dir.join(E4_K2_WEIGHTS);
    let checkpoint = open(&dir);
    assert_eq!(checkpoint.config.hidden_size, 48);
    let err = match checkpoint.load_model::<Cpu>(&Default::default(), MoeKernel::Reference) {
        Ok(_) => panic!("loaded with hidden_size 48"),
        Err(e) => e,
    };
    // The first tensor read is the embedding, [vocab_size 96, hidden_size].
    assert!(
        matches!(&err, CheckpointError::Shape { name, file, expected, found }
            if name == "model.embed_tokens.weight" && *file == s(&weights) && expected == &[96, 48] && found == &[96, 32]),
        "{err:?}"
    );
    assert_mentions(&err, &["model.embed_tokens.weight", &s(&weights), "[96, 32]", "[96, 48]"]);

    // One layer fewer in the config: the last layer's tensors become unexpected.
    let (_tmp, dir) = copy_fixture("e4_k2");
    edit_config(&dir, |c| c["num_hidden_layers"] = 1.into());
    let err = load_err(&dir);
    match &err {
        CheckpointError::UnexpectedTensors { names, .. } => {
            assert_eq!(names.len(), 4 + 2 + 1 + 4 * 3, "{names:?}");
            assert!(names.iter().all(|n| n.starts_with("model.layers.1.")), "{names:?}");
        }
        other => panic!("expected UnexpectedTensors, got {other:?}"),
    }
    assert_mentions(&err, &["19 tensor(s)", "model.layers.1.self_attn.q_proj.weight"]);

    // One layer more: the first tensor of the absent layer is missing.
    let (_tmp, dir) = copy_fixture("e4_k2");
    edit_config(&dir, |c| c["num_hidden_layers"] = 3.into());
    let err = load_err(&dir);
    assert!(
        matches!(&err, CheckpointError::MissingTensor { name, .. } if name == "model.layers.2.self_attn.q_proj.weight"),
        "{err:?}"
    );
}

#[test]
fn checkpoint_without_expert_tensors_is_unknown_layout() {
    let (_tmp, dir) = copy_fixture("e4_k2");
    rewrite(&dir.join(E4_K2_WEIGHTS), |t| t.retain(|name, _| !name.contains(".block_sparse_moe.")));
    let err = open_err(&dir);
    assert!(matches!(&err, CheckpointError::UnknownLayout { dir: d } if *d == s(&dir)), "{err:?}");
    assert_mentions(&err, &[&s(&dir), "block_sparse_moe", "mlp.experts"]);
}

// ---------------------------------------------------------------------------------------------
// 10. Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn every_fixture_round_trips_through_classic_f32_bit_exactly() {
    let cases = fixture_cases();
    assert!(cases.len() >= 7, "expected the committed fixtures, found {}", cases.len());
    let mut layouts_seen = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let original = open(&case.join("model"));
        layouts_seen.push(original.layout);
        let model = load(&original);

        let tmp = TempDir::new().unwrap();
        let out = tmp.path().join("saved");
        save_hf_classic(&model, &original.config, &out, SaveDtype::F32).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(out.join("model.safetensors").exists() && out.join("config.json").exists(), "{name}");
        let leftovers: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 2, "{name}: save left extra files: {leftovers:?}");

        let reopened = open(&out);
        assert_eq!(reopened.layout, HfLayout::Classic, "{name}");
        assert_eq!(reopened.config, original.config, "{name}: config changed in the round trip");
        let saved_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(saved_json["torch_dtype"], "float32", "{name}");
        for (tensor, raw) in read_raw(&out.join("model.safetensors")).0 {
            assert_eq!(raw.dtype, Dtype::F32, "{name}: {tensor}");
        }
        let reloaded = load(&reopened);

        let (a, b) = (model_tensors(&model, HfLayout::Classic), model_tensors(&reloaded, HfLayout::Classic));
        assert_eq!(a.len(), b.len(), "{name}");
        for ((na, sa, va), (nb, sb, vb)) in a.iter().zip(&b) {
            assert_eq!(na, nb, "{name}");
            assert_eq!(sa, sb, "{name}: {na}");
            assert!(bits(va) == bits(vb), "{name}: {na} differs after the round trip");
        }
        // The original layout too (fused checkpoints read back into the same fused tensors).
        let (a, b) = (model_tensors(&model, original.layout), model_tensors(&reloaded, original.layout));
        assert!(a.iter().zip(&b).all(|(x, y)| x.0 == y.0 && x.1 == y.1 && bits(&x.2) == bits(&y.2)), "{name}");

        let vocab = original.config.vocab_size;
        let (shape_a, logits_a) = logits(&model, vocab);
        let (shape_b, logits_b) = logits(&reloaded, vocab);
        assert_eq!(shape_a, vec![2, 6, vocab], "{name}");
        assert_eq!(shape_a, shape_b, "{name}");
        assert!(logits_a.iter().all(|x| x.is_finite()), "{name}: non-finite logits");
        assert!(bits(&logits_a) == bits(&logits_b), "{name}: logits differ after the round trip");
    }
    assert!(layouts_seen.contains(&HfLayout::Classic) && layouts_seen.contains(&HfLayout::Fused));
}

#[test]
fn model_tensors_equal_the_checkpoint_file_values() {
    // hf_tensors in the checkpoint's own layout reproduces every on-disk tensor (converted to f32).
    for case in fixture_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let checkpoint = open(&case.join("model"));
        let model = load(&checkpoint);
        let on_disk = read_raw_dir(&case.join("model"));
        let ours = model_tensors(&model, checkpoint.layout);
        assert_eq!(ours.len(), on_disk.len(), "{name}");
        for (tensor, shape, values) in ours {
            let raw = on_disk.get(&tensor).unwrap_or_else(|| panic!("{name}: {tensor} not on disk"));
            assert_eq!(shape, raw.shape, "{name}: {tensor}");
            assert!(bits(&values) == bits(&raw.to_f32()), "{name}: {tensor} values differ from the file");
        }
    }
}

#[test]
fn fused_export_reproduces_the_transformers_file() {
    let source = fixtures_dir().join("fused/model");
    let checkpoint = open(&source);
    assert_eq!(checkpoint.layout, HfLayout::Fused);
    let model = load(&checkpoint);
    let tmp = TempDir::new().unwrap();
    save_hf(&model, &checkpoint.config, tmp.path(), HfLayout::Fused, SaveDtype::F32).unwrap();

    let original = read_f32_tensors(&source.join("model.safetensors"));
    let written = read_f32_tensors(&tmp.path().join("model.safetensors"));
    assert_eq!(
        original.keys().collect::<Vec<_>>(),
        written.keys().collect::<Vec<_>>(),
        "tensor names differ from transformers' fused checkpoint"
    );
    for (name, want) in &original {
        let got = &written[name];
        assert_eq!(got.shape, want.shape, "{name}");
        assert!(bits(&got.data) == bits(&want.data), "{name}: values differ");
    }
    // The raw bytes and dtypes too (and the "format": "pt" metadata transformers needs).
    let (raw_original, meta_original) = read_raw(&source.join("model.safetensors"));
    let (raw_written, meta_written) = read_raw(&tmp.path().join("model.safetensors"));
    assert_eq!(raw_original, raw_written);
    assert_eq!(meta_written.as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
    assert_eq!(meta_original.as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));

    let reopened = open(tmp.path());
    assert_eq!(reopened.layout, HfLayout::Fused);
    assert_eq!(reopened.config, checkpoint.config);
    let reloaded = load(&reopened);
    let vocab = checkpoint.config.vocab_size;
    assert!(bits(&logits(&model, vocab).1) == bits(&logits(&reloaded, vocab).1));
}

#[test]
fn fused_f16_export_reproduces_the_sharded_transformers_bytes() {
    // f16 → f32 → f16 is exact, so saving the f16 fused checkpoint as f16 must give back the very
    // bytes transformers wrote (gathered from its two shards into one file).
    let source = fixtures_dir().join("fused_sharded_f16/model");
    let checkpoint = open(&source);
    assert_eq!(checkpoint.layout, HfLayout::Fused);
    let model = load(&checkpoint);
    let tmp = TempDir::new().unwrap();
    save_hf(&model, &checkpoint.config, tmp.path(), HfLayout::Fused, SaveDtype::F16).unwrap();
    let original = read_raw_dir(&source);
    assert!(original.values().all(|t| t.dtype == Dtype::F16));
    let (written, _) = read_raw(&tmp.path().join("model.safetensors"));
    assert_eq!(original, written);
}

#[test]
fn half_precision_save_rounds_each_value_once() {
    let source = fixtures_dir().join("e4_k2/model");
    let checkpoint = open(&source);
    let model = load(&checkpoint);
    let f32_values = model_tensors(&model, HfLayout::Classic);
    let vocab = checkpoint.config.vocab_size;

    for (dtype, st_dtype, torch_dtype) in
        [(SaveDtype::Bf16, Dtype::BF16, "bfloat16"), (SaveDtype::F16, Dtype::F16, "float16")]
    {
        let round = |v: f32| match dtype {
            SaveDtype::Bf16 => half::bf16::from_f32(v).to_f32(),
            SaveDtype::F16 => half::f16::from_f32(v).to_f32(),
            SaveDtype::F32 => v,
        };
        let tmp = TempDir::new().unwrap();
        save_hf_classic(&model, &checkpoint.config, tmp.path(), dtype).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(json["torch_dtype"], torch_dtype);
        let (raw, _) = read_raw(&tmp.path().join("model.safetensors"));
        assert!(raw.values().all(|t| t.dtype == st_dtype), "{dtype:?}: not every tensor is {st_dtype:?}");

        let reopened = open(tmp.path());
        assert_eq!(reopened.layout, HfLayout::Classic);
        assert_eq!(reopened.config, checkpoint.config);
        let reloaded = load(&reopened);
        let got = model_tensors(&reloaded, HfLayout::Classic);
        assert_eq!(got.len(), f32_values.len());
        let mut changed = 0usize;
        for ((name, shape, want), (gname, gshape, values)) in f32_values.iter().zip(&got) {
            assert_eq!(name, gname);
            assert_eq!(shape, gshape, "{name}");
            let rounded: Vec<f32> = want.iter().map(|&v| round(v)).collect();
            assert!(bits(&rounded) == bits(values), "{dtype:?}: {name} is not the rounded f32 value");
            changed += want.iter().zip(values).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        }
        assert!(changed > 0, "{dtype:?}: rounding changed nothing, the test would not see a missing conversion");

        // Saving the rounded model again in the same dtype is lossless.
        let tmp2 = TempDir::new().unwrap();
        save_hf_classic(&reloaded, &reopened.config, tmp2.path(), dtype).unwrap();
        assert_eq!(read_raw(&tmp2.path().join("model.safetensors")).0, raw, "{dtype:?}: second save differs");

        let (_, l) = logits(&reloaded, vocab);
        assert!(l.iter().all(|x| x.is_finite()));
    }
}

// ---------------------------------------------------------------------------------------------
// 11. read_input_ids
// ---------------------------------------------------------------------------------------------

fn write_ids(path: &Path, dtype: Dtype, shape: &[usize], ids: &[i64]) {
    let bytes: Vec<u8> = match dtype {
        Dtype::I64 => ids.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::I32 => ids.iter().flat_map(|v| (*v as i32).to_le_bytes()).collect(),
        Dtype::F32 => ids.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect(),
        other => panic!("{other:?}"),
    };
    let mut tensors = BTreeMap::new();
    tensors.insert("input_ids".to_string(), RawTensor { dtype, shape: shape.to_vec(), bytes });
    write_raw(path, &tensors, None);
}

#[test]
fn input_ids_are_read_and_checked_against_the_vocabulary() {
    let tmp = TempDir::new().unwrap();
    let path = tmp.path().join("input_ids.safetensors");
    let vocab = 96;

    // Valid, in both integer dtypes.
    for dtype in [Dtype::I64, Dtype::I32] {
        write_ids(&path, dtype, &[2, 3], &[0, 1, 95, 4, 5, 6]);
        let data = read_input_ids(&path, vocab).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        assert_eq!(data.shape.to_vec(), vec![2, 3]);
        assert_eq!(data.iter::<i64>().collect::<Vec<_>>(), vec![0, 1, 95, 4, 5, 6]);
    }
    // The committed fixture inputs are valid.
    for case in fixture_cases() {
        let c = open(&case.join("model"));
        read_input_ids(&case.join("input_ids.safetensors"), c.config.vocab_size).unwrap();
    }

    let is_input = |err: &CheckpointError| matches!(err, CheckpointError::Input { path: p, .. } if *p == s(&path));

    // An id equal to the vocabulary size, at flat position 4.
    write_ids(&path, Dtype::I64, &[2, 3], &[0, 1, 2, 3, 96, 5]);
    let err = read_input_ids(&path, vocab).unwrap_err();
    assert!(is_input(&err), "{err:?}");
    assert_mentions(&err, &["invalid input", &s(&path), "token id 96", "position 4", "0..96"]);

    // A much larger one in an I32 file, and a negative one.
    write_ids(&path, Dtype::I32, &[1, 4], &[7, 8, 9, 1000]);
    let err = read_input_ids(&path, vocab).unwrap_err();
    assert!(is_input(&err), "{err:?}");
    assert_mentions(&err, &[&s(&path), "token id 1000", "position 3"]);
    write_ids(&path, Dtype::I64, &[1, 3], &[7, -1, 9]);
    let err = read_input_ids(&path, vocab).unwrap_err();
    assert!(is_input(&err), "{err:?}");
    assert_mentions(&err, &[&s(&path), "token id -1", "position 1"]);

    // 1-D ids.
    write_ids(&path, Dtype::I64, &[5], &[1, 2, 3, 4, 5]);
    let err = read_input_ids(&path, vocab).unwrap_err();
    assert!(is_input(&err), "{err:?}");
    assert_mentions(&err, &[&s(&path), "[B, S]", "[5]"]);

    // Empty batch.
    write_ids(&path, Dtype::I64, &[0, 4], &[]);
    let err = read_input_ids(&path, vocab).unwrap_err();
    assert!(is_input(&err), "{err:?}");
    assert_mentions(&err, &[&s(&path), "[0, 4]"]);

    // Float ids.
    write_ids(&path, Dtype::F32, &[1, 2], &[1, 2]);
    let err = read_input_ids(&path, vocab).unwrap_err();
    assert!(is_input(&err), "{err:?}");
    assert_mentions(&err, &[&s(&path), "F32", "I64 or I32"]);

    // No `input_ids` tensor.
    let mut other = BTreeMap::new();
    other.insert(
        "tokens".to_string(),
        RawTensor { dtype: Dtype::I64, shape: vec![1, 1], bytes: 1i64.to_le_bytes().to_vec() },
    );
    write_raw(&path, &other, None);
    let err = read_input_ids(&path, vocab).unwrap_err();
    assert!(is_input(&err), "{err:?}");
    assert_mentions(&err, &[&s(&path), "input_ids"]);

    // Missing and corrupt files.
    let absent = tmp.path().join("absent.safetensors");
    let err = read_input_ids(&absent, vocab).unwrap_err();
    assert!(matches!(&err, CheckpointError::Io { path, .. } if *path == s(&absent)), "{err:?}");
    std::fs::write(&path, b"short").unwrap();
    let err = read_input_ids(&path, vocab).unwrap_err();
    assert!(matches!(&err, CheckpointError::Safetensors { path: p, .. } if *p == s(&path)), "{err:?}");
    assert_mentions(&err, &[&s(&path)]);
}

#[test]
fn saving_over_a_sharded_checkpoint_is_read_back() {
    // Saving a model into a directory that holds a sharded checkpoint writes `model.safetensors`;
    // reopening the directory must then read what was just saved, not the old shards.
    let (_tmp, dir) = copy_fixture("sharded_bf16");
    let old = open(&dir);
    let fresh = old.config.init::<Cpu>(&Default::default());
    save_hf_classic(&fresh, &old.config, &dir, SaveDtype::F32).unwrap();
    let reopened = open(&dir);
    let reloaded = load(&reopened);
    assert!(!dir.join("model.safetensors.index.json").exists(), "stale shard index left behind");
    let (a, b) = (model_tensors(&fresh, HfLayout::Classic), model_tensors(&reloaded, HfLayout::Classic));
    for ((name, _, want), (_, _, got)) in a.iter().zip(&b) {
        assert!(bits(want) == bits(got), "{name}: reopened checkpoint does not hold the saved values");
    }
}

// ---------------------------------------------------------------------------------------------
// Sharded loading: a block of a tensor, read without the rest
// ---------------------------------------------------------------------------------------------

/// Host reference: the block of a row-major tensor.
fn host_block(full: &[f32], shape: &[usize], ranges: &[std::ops::Range<usize>]) -> Vec<f32> {
    let mut out = Vec::new();
    let total: usize = shape.iter().product();
    for flat in 0..total {
        let mut rest = flat;
        let mut inside = true;
        for d in (0..shape.len()).rev() {
            let i = rest % shape[d];
            rest /= shape[d];
            inside &= ranges[d].contains(&i);
        }
        if inside {
            out.push(full[flat]);
        }
    }
    out
}

#[test]
fn block_reads_equal_slices_of_the_full_tensor_in_every_dtype() {
    for case in ["e4_k2", "sharded_bf16", "fused_sharded_f16"] {
        let (_tmp, dir) = copy_fixture(case);
        let ckpt = open(&dir);
        let names: Vec<String> = ckpt.files.names().map(str::to_string).collect();
        for name in names {
            let shape = ckpt.files.shape(&name).unwrap().to_vec();
            let full = ckpt.files.read_f32(&name, &shape).unwrap();
            // Rows 1.. of dim 0 (a Shard(0) piece), and a middle block of the last dim.
            let mut ranges: Vec<std::ops::Range<usize>> = shape.iter().map(|&n| 0..n).collect();
            ranges[0] = 1.min(shape[0])..shape[0];
            let got = ckpt.files.read_f32_block(&name, &ranges).unwrap();
            assert_eq!(bits(&got), bits(&host_block(&full, &shape, &ranges)), "{case} {name} {ranges:?}");
            let last = shape.len() - 1;
            ranges[last] = shape[last] / 3..(2 * shape[last]).div_ceil(3);
            let got = ckpt.files.read_f32_block(&name, &ranges).unwrap();
            assert_eq!(bits(&got), bits(&host_block(&full, &shape, &ranges)), "{case} {name} {ranges:?}");
            // An empty shard (torch.chunk's trailing empty piece) is a valid, empty read.
            ranges[0] = shape[0]..shape[0];
            assert!(ckpt.files.read_f32_block(&name, &ranges).unwrap().is_empty());
        }
    }
}

#[test]
fn block_outside_the_tensor_is_a_slice_error_naming_shape_and_ranges() {
    let (_tmp, dir) = copy_fixture("e4_k2");
    let ckpt = open(&dir);
    let name = "model.embed_tokens.weight";
    let shape = ckpt.files.shape(name).unwrap().to_vec();
    let err = ckpt.files.read_f32_block(name, &[0..shape[0] + 1, 0..shape[1]]).unwrap_err();
    assert_mentions(&err, &[name, "model.safetensors", &format!("{shape:?}"), &format!("{}", shape[0] + 1)]);
    let err = ckpt.files.read_f32_block(name, &[0..1]).unwrap_err();
    assert!(matches!(err, CheckpointError::Slice { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Loading only some experts (expert-parallel ranks)
// ---------------------------------------------------------------------------------------------

/// Every float parameter's bits, in module order.
fn parameter_bits(model: &MixtralForCausalLM<Cpu>) -> Vec<Vec<u32>> {
    use burn::module::{Module, ModuleVisitor, Param};
    struct All(Vec<Vec<u32>>);
    impl ModuleVisitor<Cpu> for All {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Cpu, D>>) {
            self.0.push(p.val().into_data().iter::<f32>().map(f32::to_bits).collect());
        }
    }
    let mut all = All(Vec::new());
    model.visit(&mut all);
    all.0
}

/// `load_model_with_experts(Some(range))` gives exactly what cutting the fully loaded model gives
/// (`DMoe::local_experts`: the experts `range`, the whole router), in both expert layouts.
#[test]
fn loading_some_experts_equals_cutting_the_full_model() {
    for case in ["e4_k2", "fused"] {
        let checkpoint = open(&fixtures_dir().join(case).join("model"));
        let experts = checkpoint.config.num_local_experts;
        for range in [0..experts / 2, experts / 2..experts, 1..experts] {
            let mut cut = load(&checkpoint);
            for layer in &mut cut.model.layers {
                layer.mlp = layer.mlp.local_experts(range.clone());
            }
            let part = checkpoint
                .load_model_with_experts::<Cpu>(&Default::default(), MoeKernel::Reference, Some(range.clone()))
                .unwrap_or_else(|e| panic!("{case} {range:?}: {e}"));
            assert_eq!(part.model.layers[0].mlp.w1.dims()[0], range.len(), "{case} {range:?}: experts held");
            assert_eq!(parameter_bits(&part), parameter_bits(&cut), "{case} {range:?}");
        }
    }
}

/// A bad expert range, and another rank's expert missing from the files, are errors naming the
/// numbers / the tensor (the other experts are checked by name even though they are not read).
#[test]
fn expert_range_errors_name_the_numbers_and_missing_experts() {
    let checkpoint = open(&fixtures_dir().join("e4_k2").join("model"));
    let experts = checkpoint.config.num_local_experts;
    for range in [2..2, 3..experts + 1] {
        let err = match checkpoint.load_model_with_experts::<Cpu>(&Default::default(), MoeKernel::Reference, Some(range.clone())) {
            Ok(_) => panic!("{range:?} loaded"),
            Err(e) => e,
        };
        assert!(matches!(err, CheckpointError::ExpertRange { .. }), "{err:?}");
        assert_mentions(&err, &[&format!("{}..{}", range.start, range.end), &format!("{experts} experts")]);
    }
    let (_tmp, dir) = copy_fixture("e4_k2");
    const NAME: &str = "model.layers.0.block_sparse_moe.experts.3.w2.weight";
    rewrite(&dir.join("model.safetensors"), |t| assert!(t.remove(NAME).is_some(), "fixture has {NAME}"));
    let err = match open(&dir).load_model_with_experts::<Cpu>(&Default::default(), MoeKernel::Reference, Some(0..2)) {
        Ok(_) => panic!("loaded without {NAME}"),
        Err(e) => e,
    };
    assert!(matches!(err, CheckpointError::MissingTensor { .. }), "{err:?}");
    assert_mentions(&err, &[NAME]);
}

/// A lazily loaded checkpoint reads nothing until a value is taken, and then only what was asked:
/// a requested piece of each parameter (the middle third of its row-major elements) equals that
/// piece of the eagerly loaded parameter, bit for bit, in both expert layouts (the fused layout's
/// `w1`/`w3` are interleaved halves of `gate_up_proj`, so pieces cross segment boundaries); the
/// element count read is exactly what was asked; a trainability probe reads nothing and follows
/// `freeze`.
#[test]
fn lazy_parameters_read_only_the_requested_piece() {
    use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
    use mixtral_burn::LazyWeights;
    type Ad = burn_moe_tests::CpuAutodiff;

    /// Takes every parameter's middle third (requested first) and its trainability probe.
    struct Pieces<'a> {
        lazy: &'a LazyWeights,
        out: Vec<Vec<u32>>,
        unread: usize,
        trainable: usize,
        asked: usize,
    }
    impl ModuleMapper<Ad> for Pieces<'_> {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<Ad, D>>) -> Param<Tensor<Ad, D>> {
            self.unread += usize::from(!p.is_initialized());
            let before = self.lazy.elements_read();
            self.trainable += usize::from(self.lazy.is_trainable(&p));
            assert_eq!(self.lazy.elements_read(), before, "the probe read elements");
            assert!(!p.is_initialized(), "the probe initialised the parameter");
            let n = p.lazy_shape().num_elements();
            let piece = n / 3..2 * n / 3;
            let mut shape = vec![1; D];
            shape[0] = piece.len();
            self.asked += piece.len();
            self.lazy.request_piece(p.id, piece, shape);
            let (id, value, mapper) = p.consume();
            self.out.push(value.clone().into_data().iter::<f32>().map(f32::to_bits).collect());
            Param::from_mapped_value(id, value, mapper)
        }
    }
    struct Thirds(Vec<Vec<u32>>);
    impl ModuleVisitor<Cpu> for Thirds {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Cpu, D>>) {
            let all: Vec<u32> = p.val().into_data().iter::<f32>().map(f32::to_bits).collect();
            let n = all.len();
            self.0.push(all[n / 3..2 * n / 3].to_vec());
        }
    }
    for case in ["e4_k2", "fused"] {
        let checkpoint = open(&fixtures_dir().join(case).join("model"));
        let eager = load(&checkpoint);
        let (model, lazy) = checkpoint.load_model_lazy::<Ad>(&Default::default(), MoeKernel::Reference, None).unwrap();
        assert_eq!(model.num_parameters(), eager.num_parameters(), "{case}");
        assert_eq!(lazy.elements_read(), 0, "{case}: counting parameters read values");
        let frozen_router = {
            let mut m = model;
            for layer in &mut m.model.layers {
                layer.mlp.gate = burn_moe_backend::freeze(layer.mlp.gate.clone());
            }
            m
        };
        let mut pieces = Pieces { lazy: &lazy, out: Vec::new(), unread: 0, trainable: 0, asked: 0 };
        let _ = frozen_router.map(&mut pieces);
        let mut thirds = Thirds(Vec::new());
        eager.visit(&mut thirds);
        let params = thirds.0.len();
        assert_eq!(pieces.unread, params, "{case}: parameters read before they were asked for");
        assert_eq!(pieces.trainable, params - checkpoint.config.num_hidden_layers, "{case}: trainability (routers frozen)");
        assert_eq!(lazy.elements_read(), pieces.asked, "{case}: elements read vs asked");
        assert_eq!(pieces.out, thirds.0, "{case}: pieces differ from the eager load");
        // A range past the tensor's end is an error naming the tensor and its shape.
        let name = "model.norm.weight";
        let d = checkpoint.config.hidden_size;
        let err = checkpoint.files.read_f32_range(name, d - 1..d + 1).unwrap_err();
        assert!(matches!(err, CheckpointError::Slice { .. }), "{err:?}");
        assert_mentions(&err, &[name, &format!("{}", d + 1)]);
    }
}
