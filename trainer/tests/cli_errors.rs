//! Command-line choices that the binary refuses before any work, run as a user would run them.

use std::process::Command;

fn trainer(args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .args(["--output-dir", dir.path().to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .output()
        .expect("running the trainer binary");
    assert!(!dir.path().join("metrics.jsonl").exists(), "a refused run must not train");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cublas_grouped_gemm_on_the_cpu_is_refused() {
    let (ok, err) = trainer(&["--grouped-gemm", "cublas", "--moe-kernel", "scatter", "--max-steps", "1"]);
    assert!(!ok);
    assert!(err.contains("--grouped-gemm cublas needs --device cuda"), "{err}");
}

#[test]
fn unknown_grouped_gemm_library_is_named() {
    let (ok, err) = trainer(&["--grouped-gemm", "cutlass", "--max-steps", "1"]);
    assert!(!ok);
    assert!(err.contains("unknown grouped GEMM library `cutlass`") && err.contains("cublas"), "{err}");
}

#[test]
fn unknown_attention_kernel_is_named_with_the_choices() {
    let (ok, err) = trainer(&["--attention", "flash", "--max-steps", "1"]);
    assert!(!ok);
    assert!(err.contains("unknown attention kernel 'flash'") && err.contains("eager, chunked"), "{err}");
}
