//! Plain-Rust cross-entropy and its gradient (f64 math), the ground truth of [`crate::xent`].

/// `(nll, lse)` per row of `rows × vocab` logits: `lse = log Σ exp(logit)`, `nll = lse − logit[target]`,
/// 0 for a target outside `0..vocab` (whose `lse` is still given).
pub fn cross_entropy(logits: &[f32], targets: &[i64], vocab: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut nll, mut lse) = (Vec::new(), Vec::new());
    for (row, &t) in logits.chunks(vocab.max(1)).zip(targets) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let l = m + row.iter().map(|&v| (f64::from(v) - m).exp()).sum::<f64>().ln();
        let valid = t >= 0 && (t as usize) < vocab;
        nll.push(if valid { (l - f64::from(row[t as usize])) as f32 } else { 0.0 });
        lse.push(l as f32);
    }
    (nll, lse)
}

/// `dlogits = dnll[r] · (softmax − onehot(target))`, zero rows for ignored targets.
pub fn cross_entropy_backward(logits: &[f32], targets: &[i64], dnll: &[f32], vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for ((row, &t), &dn) in logits.chunks(vocab.max(1)).zip(targets).zip(dnll) {
        let valid = t >= 0 && (t as usize) < vocab;
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let l = m + row.iter().map(|&v| (f64::from(v) - m).exp()).sum::<f64>().ln();
        for (c, &v) in row.iter().enumerate() {
            let d = if valid { f64::from(dn) * ((f64::from(v) - l).exp() - if c as i64 == t { 1.0 } else { 0.0 }) } else { 0.0 };
            out.push(d as f32);
        }
    }
    out
}
