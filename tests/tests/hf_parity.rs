//! Whole-model parity with transformers 5.17 (f32, CPU): logits, losses and the gradient of the loss
//! with respect to every checkpoint tensor, on every fixture made by `fixtures/make_fixtures.py`,
//! with every MoE kernel and both attention kernels (the chunked one in blocks of 3 queries, so the
//! fixtures' sequences span several blocks; `gqa_swa` has grouped-query heads and a sliding window).

use burn_moe_backend::MoeKernel;
use burn_moe_tests::{CpuAutodiff, fixture_cases, read_f32_tensors, rel_l2};
use mixtral_burn::{AttentionKernel, HfCheckpoint};
use mixtral_burn::parity::{parity_outputs_with_attention, read_input_ids};

const LOGITS_TOL: f64 = 1e-5;
const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;

fn check_case(case: &std::path::Path, kernel: MoeKernel, attention: AttentionKernel) -> Vec<String> {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let checkpoint = HfCheckpoint::open(case.join("model")).unwrap_or_else(|e| panic!("{name}: {e}"));
    let ids = read_input_ids(&case.join("input_ids.safetensors"), checkpoint.config.vocab_size).unwrap();
    let device = Default::default();
    let block = (attention == AttentionKernel::Chunked).then_some(3);
    let ours = parity_outputs_with_attention::<CpuAutodiff>(&checkpoint, ids, true, kernel, (attention, block), &device).unwrap();
    let expected = read_f32_tensors(&case.join("expected.safetensors"));
    assert_eq!(ours.len(), expected.len(), "{name}: output names differ");

    let mut failures = Vec::new();
    let mut worst_grad = (0.0f64, String::new());
    for (key, data) in &ours {
        let want = expected.get(key).unwrap_or_else(|| panic!("{name}: no expected tensor {key}"));
        let got: Vec<f32> = data.iter::<f32>().collect();
        assert_eq!(got.len(), want.data.len(), "{name}: {key} size");
        let err = rel_l2(&got, &want.data);
        let tol = match key.as_str() {
            "logits" => LOGITS_TOL,
            "loss" | "lm_loss" | "aux_loss" => LOSS_TOL,
            _ => GRAD_TOL,
        };
        if key.starts_with("grad.") {
            if err > worst_grad.0 {
                worst_grad = (err, key.clone());
            }
        } else {
            println!("[{name} {kernel} {attention}] {key}: rel err {err:.2e}");
        }
        if !(err <= tol) {
            failures.push(format!("{name} ({kernel}, {attention} attention): {key} rel err {err:.3e} > {tol:.0e}"));
        }
    }
    println!("[{name} {kernel} {attention}] worst gradient: {} rel err {:.2e}", worst_grad.1, worst_grad.0);
    failures
}

#[test]
fn every_fixture_matches_transformers() {
    let cases = fixture_cases();
    assert!(cases.len() >= 6, "expected the committed fixtures, found {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        for kernel in MoeKernel::ALL {
            failures.extend(check_case(case, kernel, AttentionKernel::Eager));
        }
        failures.extend(check_case(case, MoeKernel::Scatter, AttentionKernel::Chunked));
    }
    assert!(failures.is_empty(), "parity failures:\n{}", failures.join("\n"));
}
