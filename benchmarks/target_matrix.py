"""Compile every model x compression x target of issue 8's "done when" and record what each artifact holds.

    python benchmarks/target_matrix.py [--out benchmarks/results/target_matrix.json] [--models mlp,cnn,minilm]
                                       [--targets host,cuda-sm90,...] [--compression plain,int8,sparse-1:16]

Models: the MLP and the CNN (BatchNorm, residual) of the test suite, and the real all-MiniLM-L6-v2 (batch 1,
seq 128). Compression: none, INT8 (``Int8Dynamic``) and 1:16 (``NM(1, 16)``). Each combination is compiled and
exported; the row records the seconds, the device code the export found (fatbin / hsaco / msl for GPUs), the
params size and, for ``host``, the numerical agreement with PyTorch on the same input (max abs error; MiniLM:
cosine of the sentence embedding, since INT8 and 1:16 change the numbers by design). Non-host artifacts do not run
here: what each export proves is checked by the target's tests (tests/compiler/). CI compiles the MLP for every
combination (test_targets_compile.py); this script covers the larger models, which take minutes per GPU target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the test models (MLP, CNN)

TARGETS = ["host", "cuda-sm90", "rocm-gfx942", "arm64", "metal"]
COMPRESSION = ["plain", "int8", "sparse-1:16"]


def _models(names):
    import torch

    out = {}
    if "mlp" in names:
        from models import MLP, seeded

        out["mlp"] = lambda: (seeded(MLP), (torch.randn(4, 32, generator=torch.Generator().manual_seed(1)),))
    if "cnn" in names:
        from models import CNN, randomize_bn, seeded

        out["cnn"] = lambda: (randomize_bn(seeded(CNN)),
                              (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)),))
    if "minilm" in names:
        def _minilm():
            from ember.models import corpus, minilm

            enc = minilm.load_encoder()
            ids, mask = minilm.tokenize(minilm.load_tokenizer(), corpus.stdlib_sentences(1))
            return enc, (torch.from_numpy(ids), torch.from_numpy(mask))

        out["minilm"] = _minilm
    return out


def _kwargs(compression):
    from ember import NM, Int8Dynamic

    return {"plain": {}, "int8": {"quantization": Int8Dynamic()}, "sparse-1:16": {"sparsity": NM(1, 16)}}[compression]


def _host_check(name, cm, model, args):
    import torch

    with torch.no_grad():
        ref = model(*args)
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    got = cm(*[a.numpy() for a in args])
    got = got[0] if isinstance(got, (list, tuple)) else got
    got = np.asarray(got.numpy() if hasattr(got, "numpy") else got)
    res = {"max_abs_err": float(np.max(np.abs(got - ref)))}
    if name == "minilm":
        a, b = got.reshape(got.shape[0], -1), ref.reshape(ref.shape[0], -1)
        res["cos"] = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "target_matrix.json"))
    ap.add_argument("--models", default="mlp,cnn,minilm")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--compression", default=",".join(COMPRESSION))
    a = ap.parse_args()
    import ember

    rows = []
    models = _models(a.models.split(","))
    for name, make in models.items():
        model, args = make()
        for comp in a.compression.split(","):
            for target in a.targets.split(","):
                row = {"model": name, "compression": comp, "target": target}
                t0 = time.perf_counter()
                try:
                    cm = ember.compile(model, args, target=target, **_kwargs(comp))
                    with tempfile.TemporaryDirectory() as d:
                        art = cm.export(os.path.join(d, "art"))
                        manifest = json.load(open(os.path.join(art, "manifest.json")))
                        row["params_mib"] = round(os.path.getsize(os.path.join(art, "params.bin")) / 2**20, 2)
                    row["seconds"] = round(time.perf_counter() - t0, 1)
                    gpu = manifest["target"].get("gpu")
                    row["device_code"] = gpu["device_code"] if gpu else "host " + manifest["target"].get("arch", "")
                    row["compression_recorded"] = sorted(manifest.get("compression", {}))
                    if target == "host":
                        row.update(_host_check(name, cm, model, args))
                    row["ok"] = True
                except Exception as e:  # noqa: BLE001 - a failing combination is a result to record
                    row.update(ok=False, seconds=round(time.perf_counter() - t0, 1),
                               error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}")
                    traceback.print_exc()
                rows.append(row)
                print(json.dumps(row), flush=True)
                os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
                with open(a.out, "w") as f:
                    json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    print("\n| model | compression | " + " | ".join(a.targets.split(",")) + " |")
    print("| --- | --- |" + " --- |" * len(a.targets.split(",")))
    for name in models:
        for comp in a.compression.split(","):
            cells = []
            for target in a.targets.split(","):
                r = next(r for r in rows if (r["model"], r["compression"], r["target"]) == (name, comp, target))
                cells.append(f"ok {r['seconds']:.0f} s" if r["ok"] else "FAIL")
            print(f"| {name} | {comp} | " + " | ".join(cells) + " |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
