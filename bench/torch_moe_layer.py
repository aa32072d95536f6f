#!/usr/bin/env python3
"""The dMoE layer that `moe_bench` times, in PyTorch on the same card: the torch side of issue 3's
benchmark, kept in the repo so that one device call runs both (`bench/gpu_run.sh` runs it first).

Same work as burn-moe's `scatter` path: a softmax top-k router (f32 softmax, weights renormalised
and rounded to the activations' dtype, as transformers' MixtralTopKRouter), tokens sorted by expert
on the device (no host sync), `torch._grouped_mm` for the three expert GEMMs, SwiGLU, the weighted
combine by `index_add_`. Also dense SwiGLU on 2T tokens (the ceiling) and, with `--check`, the
grouped layer against a per-expert loop at a small size.

TFLOP/s on 2·T·k·3·d·ffn per forward, ×3 for forward+backward (the formula moe_bench prints); median
of `--reps` CUDA-event timings after `--warm` runs; peak memory from torch's allocator over one
forward+backward, above what lived before it.

    python3 bench/torch_moe_layer.py --tokens 4096,16384 [--d 4096 --ffn 14336 --experts 8 --top-k 2]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F


def route(x, gate, k):
    probs = torch.softmax((x @ gate.t()).float(), dim=-1)
    top, experts = probs.topk(k, dim=-1)
    return (top / top.sum(-1, keepdim=True)).to(x.dtype), experts


def moe_grouped(x, gate, w1, w3, w2, k):
    """w1, w3: [E, ffn, d]; w2: [E, d, ffn] (PyTorch's [out, in] per expert)."""
    weights, experts = route(x, gate, k)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // k
    offs = torch.cumsum(torch.bincount(flat, minlength=gate.shape[0]), 0).to(torch.int32)
    xs = x[tokens]
    h = F.silu(torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs)) * torch._grouped_mm(xs, w3.transpose(-2, -1), offs=offs)
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs) * weights.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, tokens, y)


def moe_loop(x, gate, w1, w3, w2, k):
    """f32 experts, routed as `moe_grouped` routes bf16 inputs (so near-ties pick the same experts)."""
    weights, experts = route(x.bfloat16(), gate.bfloat16(), k)
    weights = weights.float()
    out = torch.zeros_like(x)
    for e in range(gate.shape[0]):
        tok, slot = (experts == e).nonzero(as_tuple=True)
        if tok.numel():
            xe = x[tok]
            ye = (F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())) @ w2[e].t()
            out.index_add_(0, tok, ye * weights[tok, slot].unsqueeze(1))
    return out


def dense_swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def timed(fn, warm, reps):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gib(fn):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def profile_kernels(step, t, steps=3):
    """Kernel time per step by kernel name (CUPTI through torch.profiler), largest first: where the
    torch layer's time goes, to set next to ncu's list of ours."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = [(e.device_time_total / steps / 1e3, e.count // steps, e.key) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows if r[1] > 0)
    print(f"torch grouped_mm MoE T={t} profile: kernel time per fwd+bwd {total:.3f} ms")
    for ms, n, name in rows[:30]:
        print(f"  {ms:8.3f} ms  x{n:<3d} {name[:110]}")


def params(e, d, ffn, dtype, grad):
    def p(*shape, fan_in):
        return (torch.randn(*shape, device="cuda", dtype=torch.float32) / fan_in**0.5).to(dtype).requires_grad_(grad)
    return p(e, d, fan_in=d), p(e, ffn, d, fan_in=d), p(e, ffn, d, fan_in=d), p(e, d, ffn, fan_in=ffn)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--check", action="store_true", help="compare with a per-expert loop at T=512, d=256, ffn=512 first")
    ap.add_argument("--profile", action="store_true",
                    help="also list the grouped layer's kernels per forward+backward (torch.profiler, y.backward(gy) as the anchors)")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; d={a.d} ffn={a.ffn} E={a.experts} k={a.top_k} bf16")
    if a.check:
        g, w1, w3, w2 = params(a.experts, 256, 512, torch.float32, False)
        x = torch.randn(512, 256, device="cuda")
        # _grouped_mm wants bf16: compare both paths on the same bf16-rounded operands, in f32 for the loop.
        bf = [t.bfloat16() for t in (x, g, w1, w3, w2)]
        got = moe_grouped(*bf, a.top_k).float()
        want = moe_loop(*[t.float() for t in bf], a.top_k)
        err = ((got - want).norm() / want.norm()).item()
        print(f"check: grouped vs per-expert loop rel L2 {err:.2e} (bound 1e-2) {'ok' if err <= 1e-2 else 'FAIL'}")
    for t in [int(v) for v in a.tokens.split(",")]:
        flops = 2 * t * a.top_k * 3 * a.d * a.ffn
        g, w1, w3, w2 = params(a.experts, a.d, a.ffn, torch.bfloat16, True)
        x = torch.randn(t, a.d, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            fwd = timed(lambda: moe_grouped(x, g, w1, w3, w2, a.top_k), a.warm, a.reps)
        xg = x.clone().requires_grad_(True)

        def step():
            moe_grouped(xg, g, w1, w3, w2, a.top_k).float().sum().backward()

        both = timed(step, a.warm, a.reps)
        mem = peak_gib(step)
        print(f"torch grouped_mm MoE T={t}: forward {fwd:.3f} ms {flops / fwd / 1e9:.1f} TFLOP/s | "
              f"fwd+bwd {both:.3f} ms {3 * flops / both / 1e9:.1f} TFLOP/s | fwd+bwd transient {mem:.2f} GiB")
        if a.profile:
            profile_kernels(lambda: moe_grouped(xg, g, w1, w3, w2, a.top_k).backward(torch.ones_like(x)), t)
        del g, w1, w3, w2, x, xg
        d1, d3, d2 = (torch.randn(a.d, a.ffn, device="cuda", dtype=torch.bfloat16, requires_grad=True),
                      torch.randn(a.d, a.ffn, device="cuda", dtype=torch.bfloat16, requires_grad=True),
                      torch.randn(a.ffn, a.d, device="cuda", dtype=torch.bfloat16, requires_grad=True))
        x2 = torch.randn(t * a.top_k, a.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with torch.no_grad():
            fwd = timed(lambda: dense_swiglu(x2, d1, d3, d2), a.warm, a.reps)
        both = timed(lambda: dense_swiglu(x2, d1, d3, d2).float().sum().backward(), a.warm, a.reps)
        print(f"torch dense SwiGLU on 2T={t * a.top_k} tokens: forward {fwd:.3f} ms {flops / fwd / 1e9:.1f} TFLOP/s | "
              f"fwd+bwd {both:.3f} ms {3 * flops / both / 1e9:.1f} TFLOP/s")
        del d1, d3, d2, x2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
