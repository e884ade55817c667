"""CUDA artifacts compiled here (no GPU) run on a GPU machine with TVM's runtime only: numerics and latency.

Step 1, on the build machine (no GPU needed):
    python benchmarks/gpu_verify.py prepare --out gpu_artifacts [--target cuda-sm90]
compiles the test models and a MiniLM-architecture encoder (random weights, vocabulary cut to 1024 so the
weights fit in one device-tool call) and saves their inputs.

Step 2, on the GPU machine, runtime-only (see shared/gpu/README.md):
    python benchmarks/gpu_verify.py run gpu_artifacts --out $OUT
loads each artifact with ember.load(device="cuda"), compares with PyTorch on the same GPU, and times both
(ember: the current GPU schedules; torch: eager, same dtype). Writes gpu_verify.json.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import minilm_arch, prepare_run_parser  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "tests"))



def build_models():
    """name -> (torch module, example inputs as numpy). Deterministic: the same on both machines."""
    import torch
    from models import CNN, MLP, TinyTransformer, randomize_bn, seeded

    g = torch.Generator().manual_seed(0)
    out = {
        "mlp_b8": (seeded(MLP), (torch.randn(8, 32, generator=g),)),
        "cnn_b1": (randomize_bn(seeded(CNN)), (torch.randn(1, 3, 32, 32, generator=g),)),
        "transformer_b4": (seeded(TinyTransformer), (torch.randint(0, 100, (4, 16), generator=g),
                                                     torch.ones(4, 16, dtype=torch.int64))),
    }
    try:
        encoder = minilm_arch()
        ids = torch.randint(0, 1024, (1, 128), generator=g)
        out["minilm_arch_b1_s128"] = (encoder, (ids, torch.ones(1, 128, dtype=torch.int64)))
    except ImportError:
        pass
    return {k: (m, tuple(a.numpy() for a in args)) for k, (m, args) in out.items()}


def prepare(a):
    import torch

    import ember

    os.makedirs(a.out, exist_ok=True)
    for name, (model, args) in build_models().items():
        t0 = time.perf_counter()
        cm = ember.compile(model, tuple(torch.from_numpy(x) for x in args), target=a.target)
        path = cm.export(os.path.join(a.out, name), overwrite=True)
        np.savez(os.path.join(a.out, name + ".inputs.npz"), *args)
        print(f"{name}: compiled for {a.target} in {time.perf_counter() - t0:.1f} s -> {path} "
              f"({cm.manifest['target'].get('gpu')})")


def _time(fn, sync, repeat=50):
    for _ in range(10):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def run(a):
    import torch

    import ember

    results = []
    models = build_models()
    for name in sorted(os.listdir(a.dir)):
        art = os.path.join(a.dir, name)
        if not os.path.isdir(art) or name not in models:
            continue
        model, _ = models[name]
        args = list(np.load(os.path.join(a.dir, name + ".inputs.npz")).values())
        row = {"model": name}
        try:
            m = ember.load(art, device="cuda")
            t_args = [torch.from_numpy(x).cuda() for x in args]
            ours = m(*t_args)  # torch in, torch out, on the GPU through DLPack
            tm = model.cuda()
            with torch.inference_mode():
                ref = tm(*t_args)
                row["torch_eager_ms"] = _time(lambda: tm(*t_args), torch.cuda.synchronize)
            err = float((ours.float() - ref.float()).abs().max())
            row["max_abs_err"] = err
            row["scale"] = float(ref.abs().max())
            row["ok"] = bool(err <= 1e-3 * max(1.0, row["scale"]))
            row["ember_ms"] = m.benchmark(*t_args, repeat=50).median_ms
        except Exception as e:  # report every model, failures included
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        results.append(row)
        print(json.dumps(row))
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "command": " ".join(sys.argv), "results": results}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu_verify.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"\n{info['gpu']}")
    print(f"{'model':24s} {'ok':>5s} {'max err':>10s} {'ember ms':>9s} {'torch ms':>9s}")
    for r in results:
        if "error" in r:
            print(f"{r['model']:24s} ERROR {r['error']}")
        else:
            print(f"{r['model']:24s} {str(r['ok']):>5s} {r['max_abs_err']:10.2e} {r['ember_ms']:9.3f} "
                  f"{r['torch_eager_ms']:9.3f}")
    if any(not r.get("ok") for r in results):
        sys.exit(1)


def main():
    ap, _, p, r = prepare_run_parser(__doc__)
    a = ap.parse_args()
    prepare(a) if a.cmd == "prepare" else run(a)


if __name__ == "__main__":
    main()
