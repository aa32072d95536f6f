//! LoRA fine-tuning end to end on the CPU: with `--use-lora attn-only` and `--use-lora all`, the loss
//! falls (only adapters can make it move: everything else is frozen) and the base weights written to
//! the checkpoint are bit-identical to the initial model.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, backend::Backend};
use clap::Parser;
use mixtral_burn::{HfCheckpoint, MixtralForCausalLM};
use trainer::Args;
use trainer::train::{default_model_config, train};

type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
type Inner = burn::backend::NdArray<f32>;

struct Collect(Vec<Vec<f32>>);

impl<Bk: Backend> ModuleVisitor<Bk> for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
        self.0.push(param.val().into_data().convert::<f32>().to_vec().unwrap());
    }
}

fn tensors(model: &MixtralForCausalLM<Inner>) -> Vec<Vec<f32>> {
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

fn run(use_lora: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let args = Args::try_parse_from([
        "trainer",
        "--use-lora",
        use_lora,
        "--lora-dropout",
        "0",
        "--learning-rate",
        "1e-2",
        "--max-steps",
        "6",
        "--per-device-train-batch-size",
        "4",
        "--save-strategy",
        "steps",
        "--save-steps",
        "6",
        "--merge-lora",
        "--output-dir",
        out.to_str().unwrap(),
    ])
    .unwrap();
    train::<B>(&args, &Default::default()).unwrap();

    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 6);
    let (first, last) = (losses[0] + losses[1], losses[4] + losses[5]);
    assert!(last < first - 0.05, "{use_lora}: loss did not fall: {losses:?}");

    // PEFT export of the trained adapters.
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64(), cfg["peft_type"].as_str()), (Some(16), Some(32.0), Some("LORA")));
    let q_b = st.tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").unwrap();
    assert_eq!(q_b.shape()[1], 16);
    assert!(q_b.data().chunks(4).any(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) != 0.0), "{use_lora}: B still zero");
    let expert = st.tensor("base_model.model.model.layers.0.block_sparse_moe.experts.0.w2.lora_A.weight");
    assert_eq!(expert.is_ok(), use_lora == "all", "{use_lora}: expert adapters exported iff --use-lora all");

    let initial = default_model_config(&args).unwrap().init_seeded::<Inner>(&Default::default(), args.seed);
    let saved: MixtralForCausalLM<Inner> =
        HfCheckpoint::open(out.join("checkpoint-6")).unwrap().load_model(&Default::default(), Default::default()).unwrap();
    let (a, b) = (tensors(&initial), tensors(&saved));
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x == y, "{use_lora}: base tensor #{i} changed during LoRA training");
    }

    // --merge-lora: adapted projections differ from the base, everything else is the base.
    let merged: MixtralForCausalLM<Inner> =
        HfCheckpoint::open(out.join("merged")).unwrap().load_model(&Default::default(), Default::default()).unwrap();
    let w = |m: &MixtralForCausalLM<Inner>| {
        let l = &m.model.layers[0];
        let v = |t: Tensor<Inner, 2>| t.into_data().to_vec::<f32>().unwrap();
        let e = |t: Tensor<Inner, 3>| t.into_data().to_vec::<f32>().unwrap();
        (v(l.self_attn.q_proj.weight.val()), e(l.mlp.w1.val()), v(m.model.embed_tokens.weight.val()), v(l.mlp.gate.val()))
    };
    let (wi, wm) = (w(&initial), w(&merged));
    assert_ne!(wi.0, wm.0, "{use_lora}: merged q_proj equals the base");
    assert_eq!(wi.1 != wm.1, use_lora == "all", "{use_lora}: merged experts differ iff experts are adapted");
    assert_eq!((wi.2, wi.3), (wm.2, wm.3), "{use_lora}: embeddings and router must be the base");
}

#[test]
fn attn_only_lora_trains_and_keeps_the_base_frozen() {
    run("attn-only");
}

#[test]
fn all_lora_trains_and_keeps_the_base_frozen() {
    run("all");
}

#[test]
fn merged_linear_adapter_computes_the_adapted_layer() {
    use mixtral_burn::LoraConfig;
    use mixtral_burn::model::HfLinear;
    let values = |n: usize, seed: u64| -> Vec<f32> { (0..n).map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0) - 1.0).collect() };
    let dev = Default::default();
    let w = Tensor::<Inner, 2>::from_data(burn::tensor::TensorData::new(values(24 * 16, 1), [24, 16]), &dev);
    let mut lin = HfLinear::from_weight(w).with_lora(&LoraConfig::new().with_r(4).with_alpha(8.0), 3);
    let x = Tensor::<Inner, 3>::from_data(burn::tensor::TensorData::new(values(2 * 3 * 16, 2), [2, 3, 16]), &dev);
    let base: Vec<f32> = lin.forward(x.clone()).into_data().to_vec().unwrap();
    let l = lin.lora.as_mut().unwrap();
    l.b = Param::from_tensor(Tensor::from_data(burn::tensor::TensorData::new(values(24 * 4, 3), [24, 4]), &dev));
    let adapted: Vec<f32> = lin.forward(x.clone()).into_data().to_vec().unwrap();
    // By hand: x·Wᵀ + 2·x·Aᵀ·Bᵀ.
    let l = lin.lora.as_ref().unwrap();
    let x2 = x.clone().reshape([6, 16]);
    let by_hand: Vec<f32> = (x2.clone().matmul(lin.weight.val().transpose())
        + x2.matmul(l.a.val().transpose()).matmul(l.b.val().transpose()) * 2.0)
        .into_data()
        .to_vec()
        .unwrap();
    let merged: Vec<f32> = lin.merge_lora().forward(x).into_data().to_vec().unwrap();
    assert!(base != adapted, "a nonzero B must change the output");
    for ((a, h), m) in adapted.iter().zip(&by_hand).zip(&merged) {
        assert!((a - h).abs() <= 1e-5 && (a - m).abs() <= 1e-5, "adapted {a}, by hand {h}, merged {m}");
    }
}
