"""ember's fusion on the CPU: kernel launches, bytes moved and latency with fusion on vs off.

    flock /tmp/ember-bench.lock python benchmarks/fusion_bench.py [--seq 128] [--rounds 8] [--attention-seq 128 512]

Peers are the same compiler with ember's fusion off (``compile_model(..., fusion=False)``: TVM's default
``FuseOps``/``FuseTIR``, then ember's schedules), so the difference is fusion alone:

1. all-MiniLM-L6-v2 (real weights, a real sentence), batch 1: kernel launches per inference and bytes moved (from
   the kernel report in the manifest), median latency of each, their outputs' max difference.
2. Attention alone (batch 1, 12 heads, head dim 64, key-padding mask, float32) at each ``--attention-seq``: the fused
   kernel vs the unfused graph (scores matrix, softmax, value product).

Timing interleaves the two variants in ``--rounds`` rounds (each round times both) so that load from other
processes hits both alike; the table shows medians over all rounds. Writes JSON next to the other results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import cpu_name, interleaved_times  # noqa: E402



def interleaved_ms(fns: dict, rounds: int, per_round: int = 10, warmup: int = 3) -> dict:
    """Median ms per call of each function, timed in alternating rounds."""
    return {k: float(np.median(v)) for k, v in interleaved_times(fns, rounds, per_round, warmup).items()}


def bench_minilm(seq: int, rounds: int) -> dict:
    import torch

    from ember.compiler.build import compile_model
    from ember.models import minilm
    from ember.models.corpus import stdlib_sentences

    encoder = minilm.load_encoder()
    tok = minilm.load_tokenizer()
    ids, mask = minilm.tokenize(tok, stdlib_sentences(1), seq)
    example = torch.ones((1, seq), dtype=torch.int64)
    models = {}
    for fusion in (True, False):
        t0 = time.perf_counter()
        models[fusion] = compile_model(encoder, (example, example), input_names=["input_ids", "attention_mask"],
                                       output_names=["embedding"], fusion=fusion)
        print(f"  compiled MiniLM with fusion {'on' if fusion else 'off'} in {time.perf_counter() - t0:.0f} s",
              flush=True)
    out_on, out_off = (np.asarray(models[f](ids, mask)) for f in (True, False))
    with torch.inference_mode():
        ref = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    ms = interleaved_ms({"fused": lambda: models[True](ids, mask), "unfused": lambda: models[False](ids, mask)},
                        rounds)
    rep_on, rep_off = (models[f].manifest["kernels"]["ember"] for f in (True, False))
    return {
        "model": "all-MiniLM-L6-v2", "batch": 1, "seq": seq,
        "launches": {"fused": rep_on["launches"], "unfused": rep_off["launches"],
                     "tvm_default_report": models[True].manifest["kernels"]["tvm_default"]["launches"]},
        "distinct_kernels": {"fused": rep_on["distinct"], "unfused": rep_off["distinct"]},
        "bytes": {"fused": rep_on["bytes"], "unfused": rep_off["bytes"]},
        "median_ms": ms,
        "max_abs_diff_fused_vs_unfused": float(np.abs(out_on - out_off).max()),
        "max_abs_diff_fused_vs_torch": float(np.abs(out_on - ref).max()),
    }


def bench_attention(seq: int, rounds: int, heads: int = 12, dh: int = 64) -> dict:
    import tvm
    from tvm import relax

    from ember.compiler.pipeline import lower
    from ember.compiler.targets import resolve
    from ember.passes.fusion import FuseAttention

    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    sys.path[:0] = [tests, os.path.join(tests, "passes")]
    from test_fusion_attention import _attention_module  # the same graph the tests check

    tgt = resolve("host")[1]
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 1, 1, seq), "float32")
    mask[..., seq * 3 // 4:] = -1e9
    args = [tvm.runtime.tensor(rng.standard_normal((1, seq, heads, dh)).astype("float32")) for _ in range(3)]
    args.append(tvm.runtime.tensor(mask))
    vms, outs = {}, {}
    for fusion in (True, False):
        mod = _attention_module(seq, heads, dh)
        if fusion:
            mod = FuseAttention(tgt)(mod)
        with tgt:
            ex = tvm.compile(mod, tgt, relax_pipeline=lower(tgt, fusion=fusion))
        vms[fusion] = relax.VirtualMachine(ex, tvm.cpu())
        outs[fusion] = vms[fusion]["main"](*args).numpy()
    per_round = max(1, int(200 // max(seq // 128, 1) ** 2))
    ms = interleaved_ms({"fused": lambda: vms[True]["main"](*args), "unfused": lambda: vms[False]["main"](*args)},
                        rounds, per_round=min(per_round, 10))
    return {"seq": seq, "heads": heads, "head_dim": dh, "median_ms": ms,
            "max_abs_diff": float(np.abs(outs[True] - outs[False]).max()),
            "score_matrix_bytes_unfused": heads * seq * seq * 4}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=128, help="MiniLM sequence length (default 128)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--attention-seq", type=int, nargs="*", default=[128, 512])
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(sys.argv), "load_average_1min_at_start": load}
    if not a.skip_minilm:
        print("MiniLM (batch 1, seq %d): ember fusion on vs off" % a.seq, flush=True)
        result["minilm"] = bench_minilm(a.seq, a.rounds)
    result["attention"] = []
    for s in a.attention_seq:
        print(f"attention seq {s}", flush=True)
        result["attention"].append(bench_attention(s, a.rounds))

    print(f"\nmachine: {result['machine']}; load average at start {load}")
    if "minilm" in result:
        m = result["minilm"]
        fewer = 100 * (1 - m["launches"]["fused"] / m["launches"]["unfused"])
        less = 100 * (1 - m["bytes"]["fused"] / m["bytes"]["unfused"])
        print(f"{'MiniLM b1 s%d' % m['seq']:<22} {'launches':>9} {'MiB moved':>10} {'median ms':>10}")
        for k in ("unfused", "fused"):
            print(f"  ember fusion {'on ' if k == 'fused' else 'off'}      {m['launches'][k]:>9} "
                  f"{m['bytes'][k] / 2**20:>10.1f} {m['median_ms'][k]:>10.2f}")
        print(f"  -> {fewer:.0f}% fewer launches, {less:.0f}% fewer bytes, "
              f"{m['median_ms']['unfused'] / m['median_ms']['fused']:.2f}x speed; "
              f"outputs differ by {m['max_abs_diff_fused_vs_unfused']:.1e}")
    for r in result["attention"]:
        print(f"attention s{r['seq']:<5} 12x64  fused {r['median_ms']['fused']:8.2f} ms  unfused "
              f"{r['median_ms']['unfused']:8.2f} ms  ({r['median_ms']['unfused'] / r['median_ms']['fused']:.2f}x), "
              f"unfused score matrix {r['score_matrix_bytes_unfused'] / 2**20:.0f} MiB, diff {r['max_abs_diff']:.1e}")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"fusion_{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
