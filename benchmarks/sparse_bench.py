"""N:M sparsity, measured in one run: kernel speed, and accuracy after pruning + distillation on real data.

    python benchmarks/sparse_bench.py [--parts linear,digits,minilm,minilm_int8] [--out benchmarks/results]

1. linear — fp32 Linear 4096×4096, batch 1, this CPU: ember 1:16 (packed weights, sparse kernel) vs ember dense
   vs PyTorch dense (+ ember 2:4 and 1:8 for the curve). Runs are interleaved round by round and the medians
   compared, so a noisy neighbour hits every engine alike; the timing sections hold /tmp/ember-bench.lock.
2. digits — a small CNN trained here on scikit-learn's digits (real 8×8 handwriting, 1797 images, fixed split);
   1:16 on its conv and linear weights, then distillation from the dense model with the masks fixed
   (ember.sparsity.finetune): top-1 of dense / pruned / pruned+distilled, in torch and compiled by ember.
3. minilm — the real all-MiniLM-L6-v2 with 2:4 and 1:16 on every encoder Linear, a short distillation from the
   dense model on real sentences (Python stdlib docstrings, ember.models.corpus), and the cosine of the sentence
   embeddings to the dense model's on held-out sentences — whatever it is. The 1:16 encoder is also compiled by
   ember (batch 1, seq 128) and timed against ember dense and PyTorch.

4. minilm_int8 — the 1:16 MiniLM (a short distillation) compiled with fp32 and with int8 sparse values
   (``NM(1, 16)`` + ``Int8Dynamic()``): embedding cosine between the two and to the dense model on held-out
   sentences, bytes, and latency (batch 1, seq 128) against ember dense. Parts 1 and 2 also compile 1:16 + int8.
5. conv — ResNet-style 3x3 convolutions (64 ch 56x56, 128 ch 28x28, 256 ch 14x14, batch 1): ember's sparse
   conv kernel at 1:16 vs ember dense and torch dense.

Writes ``sparse_bench.json`` (and ``sparse_bench_linear.png``) under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fcntl
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchtools
from benchtools import cpu_name, interleaved_times  # noqa: E402

LOCK = "/tmp/ember-bench.lock"


@contextlib.contextmanager
def bench_lock():
    """Hold the machine-wide benchmark lock while timing (other ember benchmarks wait for it)."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)



def interleaved_medians(fns: dict, rounds: int = 15, per_round: int = 10, warmup: int = 5) -> dict:
    """Median ms per call of each function, measured in alternating rounds (fair under contention)."""
    return {k: float(np.median(v)) for k, v in interleaved_times(fns, rounds, per_round, warmup).items()}


# ---------------------------------------------------------------------------------------------------------------
def bench_linear(threads: int) -> dict:
    import torch

    import ember
    import ember.sparsity as sp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    k = n_out = 4096
    dense = torch.nn.Linear(k, n_out).eval()
    x = torch.randn(1, k)
    xn = x.numpy()
    compiled = {"ember dense": ember.compile(dense, (x,))}
    masked = {}
    int8_err = {}
    for n, m in ((1, 16), (1, 8), (2, 4)):
        model = copy.deepcopy(dense)
        sp.prune_nm(model, n, m)
        masked[f"{n}:{m}"] = model
        cm = ember.compile(model, (x,), sparsity=ember.NM(n, m))
        want = model(x).detach().numpy()
        err = float(np.abs(cm(xn) - want).max())
        assert err < 1e-3, f"ember {n}:{m} differs from the masked torch model by {err}"
        compiled[f"ember {n}:{m}"] = cm
        if m >= 8:  # sparse + int8 values (per-row scales): what ember.compile makes of NM + Int8Dynamic
            cq = ember.compile(model, (x,), sparsity=ember.NM(n, m), quantization=ember.Int8Dynamic())
            got = cq(xn)
            int8_err[f"{n}:{m}"] = {"max_abs_error_vs_fp32_sparse": float(np.abs(got - want).max()),
                                    "output_max_abs": float(np.abs(want).max()),
                                    "cosine_vs_fp32_sparse": float((got * want).sum() / (np.linalg.norm(got)
                                                                                         * np.linalg.norm(want))),
                                    "packed_bytes": cq.manifest["compression"]["sparsity"]["packed_bytes"]}
            compiled[f"ember {n}:{m} int8"] = cq
    rep = compiled["ember 1:16"].manifest["compression"]["sparsity"]
    fns = {}
    for name, cm in compiled.items():
        _, dev_inputs = cm._prepare((xn,), {})
        fns[name] = (lambda c=cm, d=dev_inputs: c.run_device(d))

    def torch_dense():
        with torch.no_grad():
            dense(x)

    fns["torch dense"] = torch_dense
    with bench_lock():
        load_before = os.getloadavg()[0]
        ms = interleaved_medians(fns)
        load_after = os.getloadavg()[0]
    out = {
        "shape": [n_out, k], "batch": 1, "dtype": "float32", "threads": threads, "median_ms": ms,
        "speedup_1_16_vs_ember_dense": ms["ember dense"] / ms["ember 1:16"],
        "speedup_1_16_vs_torch_dense": ms["torch dense"] / ms["ember 1:16"],
        "speedup_1_16_int8_vs_1_16": ms["ember 1:16"] / ms["ember 1:16 int8"],
        "bytes": {"dense": rep["dense_bytes"], "packed_1_16": rep["packed_bytes"],
                  "packed_1_16_int8": int8_err["1:16"]["packed_bytes"]},
        "int8_values": int8_err,
        "kernel": rep["kernel"], "load_avg_1min": [load_before, load_after],
    }
    print("\n== fp32 Linear 4096x4096, batch 1 (median ms, interleaved rounds) ==")
    for name, v in ms.items():
        print(f"  {name:16s} {v:8.3f} ms   ({ms['ember dense'] / v:5.2f}x ember dense, "
              f"{ms['torch dense'] / v:5.2f}x torch)")
    print(f"  weights: dense {rep['dense_bytes'] / 2**20:.1f} MiB, 1:16 packed {rep['packed_bytes'] / 2**20:.2f} MiB; "
          f"kernel: {rep['kernel']}; load {load_before:.1f} -> {load_after:.1f}")
    for key, e in int8_err.items():
        print(f"  {key} int8 values: {e['packed_bytes'] / 2**20:.2f} MiB, max |error| vs fp32 sparse "
              f"{e['max_abs_error_vs_fp32_sparse']:.2e} (outputs up to {e['output_max_abs']:.2f}), cosine "
              f"{e['cosine_vs_fp32_sparse']:.6f}")
    return out


# ---------------------------------------------------------------------------------------------------------------
def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[:, None]  # [N, 1, 8, 8] in [0, 1]
    return train_test_split(x, d.target.astype("int64"), test_size=0.25, random_state=0, stratify=d.target)


def _digits_cnn():
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
            self.c2, self.b2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
            self.fc1, self.fc2 = nn.Linear(64 * 4 * 4, 128), nn.Linear(128, 10)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(y))), 2)
            return self.fc2(torch.relu(self.fc1(torch.flatten(y, 1))))

    return DigitsCNN()


def _top1(model, x, y) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean() * 100)


def bench_digits(threads: int, steps: int) -> dict:
    import torch

    import ember
    import ember.sparsity as sp

    # Training runs single-threaded: on a shared 2-core machine a second spinning OpenMP thread only waits.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xtr, xte, ytr, yte = _digits()
    model = _digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    t0 = time.perf_counter()
    for epoch in range(20):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    train_s = time.perf_counter() - t0
    dense_acc = _top1(model, xte, yte)
    results = {"train_images": len(xtr), "test_images": len(xte), "train_seconds": round(train_s, 1),
               "dense_top1": dense_acc, "variants": {}}
    print(f"\n== digits CNN (sklearn digits, {len(xtr)} train / {len(xte)} test) ==\n  dense top-1 {dense_acc:.2f}%")

    # Distillation batches: the training images (inputs only: the teacher's logits are the targets).
    batches = [xt[i:i + 64] for i in range(0, len(xt), 64)]
    variants = {"1:16 all conv+linear": {}, "1:16 except first conv": {"skip": ("c1",)}}
    for label, kw in variants.items():
        student = copy.deepcopy(model)
        masks = sp.prune_nm(student, 1, 16, **kw)
        pruned_acc = _top1(student, xte, yte)
        t0 = time.perf_counter()
        # train_mode: BatchNorm statistics follow the pruned network (they are stale right after pruning);
        # measured here: 1:16 on every layer recovers to a 0.9 pt drop this way, 2.2 pt with frozen statistics.
        losses = sp.finetune(student, masks, batches, teacher=model, steps=steps, lr=2e-3, loss="kl",
                             temperature=4.0, train_mode=True)
        ft_s = time.perf_counter() - t0
        distilled_acc = _top1(student, xte, yte)
        assert all(sp.check_nm(student, 1, 16, masks).values())
        x1 = torch.from_numpy(xte[:64])
        cm = ember.compile(student, (x1,), sparsity=ember.NM(1, 16), dynamic_batch=True)
        ember_pred = cm(xte).argmax(-1)
        ember_acc = float((ember_pred == yte).mean() * 100)
        # + int8: sparse layers with int8 values, the dense ones (the convs) by the quantization pass
        cq = ember.compile(student, (x1,), sparsity=ember.NM(1, 16), quantization=ember.Int8Dynamic(),
                           dynamic_batch=True)
        int8_acc = float((cq(xte).argmax(-1) == yte).mean() * 100)
        rep = cm.manifest["compression"]["sparsity"]
        weights = {r["name"]: round(r["sparsity"], 4) for r in sp.sparsity_report(student, masks)}
        results["variants"][label] = {
            "pruned_top1": pruned_acc, "distilled_top1": distilled_acc, "ember_top1": ember_acc,
            "ember_1_16_int8_top1": int8_acc,
            "ember_int8_bytes": cq.manifest["compression"]["sparsity"]["packed_bytes"],
            "drop_points": round(dense_acc - distilled_acc, 2), "finetune_steps": steps,
            "finetune_seconds": round(ft_s, 1), "loss_first_last": [losses[0], losses[-1]],
            "weight_sparsity": weights, "ember_packed_layers": [r["name"] for r in rep["layers"]],
            "ember_bytes": {"dense": rep["dense_bytes"], "packed": rep["packed_bytes"]},
        }
        print(f"  {label:24s} pruned {pruned_acc:6.2f}%  distilled {distilled_acc:6.2f}%  ember {ember_acc:6.2f}%  "
              f"ember+int8 {int8_acc:6.2f}%  "
              f"drop {dense_acc - distilled_acc:+.2f} pt  ({steps} steps, {ft_s:.0f} s)")
    return results


# ---------------------------------------------------------------------------------------------------------------
def _encoder_linears(encoder):
    import torch

    return [name for name, mod in encoder.named_modules()
            if isinstance(mod, torch.nn.Linear) and ".encoder." in f".{name}"]


def _embed(encoder, tok, sentences, seq=128, batch=32):
    import torch

    from ember.models import minilm

    outs = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            ids, mask = minilm.tokenize(tok, sentences[i:i + batch], seq)
            outs.append(encoder(torch.from_numpy(ids), torch.from_numpy(mask)))
    return torch.cat(outs)


def bench_minilm(threads: int, steps: int, compile_1_16: bool) -> dict:
    import torch

    import ember
    import ember.sparsity as sp
    from ember.models import minilm
    from ember.models.corpus import stdlib_sentences

    torch.set_num_threads(1)  # distillation single-threaded (shared machine); timing below uses ``threads``
    torch.manual_seed(0)
    teacher = minilm.load_encoder()
    tok = minilm.load_tokenizer()
    sentences = stdlib_sentences(1200)
    train, held_out = sentences[:1000], sentences[1000:1200]
    seq = 64  # distillation batches: docstring first sentences fit in 64 tokens
    ref = _embed(teacher, tok, held_out)
    layers = _encoder_linears(teacher)
    batches = []
    for i in range(0, len(train), 16):
        ids, mask = minilm.tokenize(tok, train[i:i + 16], seq)
        batches.append((torch.from_numpy(ids), torch.from_numpy(mask)))
    results = {"held_out_sentences": len(held_out), "train_sentences": len(train), "pruned_linears": len(layers),
               "variants": {}}
    print(f"\n== all-MiniLM-L6-v2 (real), {len(layers)} encoder Linears pruned; cosine to dense on "
          f"{len(held_out)} held-out sentences ==")
    students = {}
    for n, m in ((2, 4), (1, 16)):
        student = copy.deepcopy(teacher)
        masks = sp.prune_nm(student, n, m, layers=layers)
        cos_pruned = float(torch.nn.functional.cosine_similarity(_embed(student, tok, held_out), ref).mean())
        t0 = time.perf_counter()
        losses = sp.finetune(student, masks, batches, teacher=teacher, steps=steps, lr=5e-5 if n == 2 else 1e-4,
                             loss="cosine+mse")
        ft_s = time.perf_counter() - t0
        emb = _embed(student, tok, held_out)
        cos = torch.nn.functional.cosine_similarity(emb, ref)
        assert all(sp.check_nm(student, n, m, masks).values())
        # Retrieval agreement: does each held-out sentence's nearest neighbour stay the same?
        sim_ref, sim = ref @ ref.T, emb @ emb.T
        sim_ref.fill_diagonal_(-2)
        sim.fill_diagonal_(-2)
        nn_agree = float((sim_ref.argmax(1) == sim.argmax(1)).float().mean())
        results["variants"][f"{n}:{m}"] = {
            "cosine_pruned_only": round(cos_pruned, 4), "cosine_distilled_mean": round(float(cos.mean()), 4),
            "cosine_distilled_min": round(float(cos.min()), 4), "nearest_neighbour_agreement": round(nn_agree, 3),
            "finetune_steps": steps, "finetune_seconds": round(ft_s, 1), "loss_first_last": [losses[0], losses[-1]],
        }
        students[f"{n}:{m}"] = student
        print(f"  {n}:{m:<3d} cosine pruned {cos_pruned:.4f} -> distilled mean {float(cos.mean()):.4f} "
              f"(min {float(cos.min()):.4f}); nearest-neighbour agreement {nn_agree:.1%} ({steps} steps, {ft_s:.0f} s)")
    if compile_1_16:
        student = students["1:16"]
        ids, mask = minilm.tokenize(tok, held_out[:1], 128)
        tid, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
        kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["embedding"])
        cm_sparse = ember.compile(student, (tid, tmask), sparsity=ember.NM(1, 16), **kwargs)
        cm_dense = ember.compile(teacher, (tid, tmask), **kwargs)
        with torch.no_grad():
            want = student(tid, tmask).numpy()
        got = cm_sparse(ids, mask)
        cos_ember = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
        rep = cm_sparse.manifest["compression"]["sparsity"]
        fns = {}
        for name, cm in (("ember 1:16", cm_sparse), ("ember dense", cm_dense)):
            _, dev_inputs = cm._prepare((ids, mask), {})
            fns[name] = (lambda c=cm, d=dev_inputs: c.run_device(d))

        def torch_dense():
            with torch.no_grad():
                teacher(tid, tmask)

        fns["torch dense"] = torch_dense
        torch.set_num_threads(threads)
        with bench_lock():
            ms = interleaved_medians(fns, rounds=6, per_round=5, warmup=3)
        results["ember_1_16_batch1_seq128"] = {
            "median_ms": ms, "cosine_ember_vs_torch_sparse": round(cos_ember, 6),
            "packed_layers": len(rep["layers"]), "dense_bytes": rep["dense_bytes"],
            "packed_bytes": rep["packed_bytes"], "kernel": rep["kernel"],
        }
        print(f"  compiled 1:16 encoder (batch 1, seq 128): " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
              + f"; ember vs torch (same sparse weights) cosine {cos_ember:.6f}; encoder Linears "
              f"{rep['dense_bytes'] / 2**20:.1f} -> {rep['packed_bytes'] / 2**20:.2f} MiB")
    return results


def bench_conv(threads: int) -> dict:
    """ResNet-style 3x3 convolutions (batch 1): ember 1:16 (sparse conv kernel) vs ember dense vs torch dense."""
    import torch

    import ember
    import ember.sparsity as sp

    torch.set_num_threads(threads)
    out = {}
    print("\n== 3x3 conv, padding 1, batch 1, fp32 (median ms, interleaved rounds) ==")
    for c, hw in ((64, 56), (128, 28), (256, 14)):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).eval()
        sparse = copy.deepcopy(conv)
        sp.prune_nm(sparse, 1, 16)
        x = torch.randn(1, c, hw, hw)
        xn = x.numpy()
        cms = {"ember dense": ember.compile(conv, (x,)), "ember 1:16": ember.compile(sparse, (x,), sparsity=ember.NM(1, 16))}
        with torch.no_grad():
            want = sparse(x).numpy()
        err = float(np.abs(cms["ember 1:16"](xn) - want).max())
        assert err < 1e-3 * max(1.0, float(np.abs(want).max())), f"sparse conv differs from torch by {err}"
        fns = {}
        for name, cm in cms.items():
            _, dev_inputs = cm._prepare((xn,), {})
            fns[name] = (lambda c_=cm, d=dev_inputs: c_.run_device(d))

        def torch_dense(conv=conv, x=x):
            with torch.no_grad():
                conv(x)

        fns["torch dense"] = torch_dense
        with bench_lock():
            load = os.getloadavg()[0]
            ms = interleaved_medians(fns, rounds=8, per_round=5, warmup=3)
        key = f"{c}x{hw}x{hw}"
        rep_ = cms["ember 1:16"].manifest["compression"]["sparsity"]
        out[key] = {"median_ms": ms, "max_abs_error_vs_torch": err, "load_avg_1min": load,
                    "bytes": {"dense": rep_["dense_bytes"], "packed": rep_["packed_bytes"]}, "kernel": rep_["kernel"]}
        print(f"  {key:12s} " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
              + f"  -> 1:16 {ms['ember dense'] / ms['ember 1:16']:.2f}x ember dense, "
              f"{ms['torch dense'] / ms['ember 1:16']:.2f}x torch (load {load:.1f})")
    return out


def bench_minilm_int8(threads: int, steps: int, sentences_n: int = 100) -> dict:
    """1:16 MiniLM compiled with fp32 sparse values vs int8 sparse values (NM(1, 16) + Int8Dynamic): how much
    the int8 values change the embeddings, on real held-out sentences, and the latency (batch 1, seq 128)."""
    import torch

    import ember
    import ember.sparsity as sp
    from ember.models import minilm
    from ember.models.corpus import stdlib_sentences

    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = minilm.load_encoder()
    tok = minilm.load_tokenizer()
    sentences = stdlib_sentences(1200)
    train, held_out = sentences[:1000], sentences[1000:1000 + sentences_n]
    student = copy.deepcopy(teacher)
    masks = sp.prune_nm(student, 1, 16, layers=_encoder_linears(teacher))
    t0 = time.perf_counter()
    if steps:
        batches = []
        for i in range(0, len(train), 16):
            ids, mask = minilm.tokenize(tok, train[i:i + 16], 64)
            batches.append((torch.from_numpy(ids), torch.from_numpy(mask)))
        sp.finetune(student, masks, batches, teacher=teacher, steps=steps, lr=1e-4, loss="cosine+mse")
    ft_s = time.perf_counter() - t0
    ids, mask = minilm.tokenize(tok, held_out[:1], 128)
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["embedding"])
    example = (torch.from_numpy(ids), torch.from_numpy(mask))
    cms = {"ember dense": ember.compile(teacher, example, **kwargs),
           "ember 1:16": ember.compile(student, example, sparsity=ember.NM(1, 16), **kwargs),
           "ember 1:16 int8": ember.compile(student, example, sparsity=ember.NM(1, 16),
                                            quantization=ember.Int8Dynamic(), **kwargs)}
    embs = {k: [] for k in cms}
    embs["torch 1:16"], embs["torch dense"] = [], []
    for sent in held_out:
        ids, mask = minilm.tokenize(tok, [sent], 128)
        for k, cm in cms.items():
            embs[k].append(np.asarray(cm(ids, mask)).reshape(-1))
        with torch.no_grad():
            embs["torch 1:16"].append(student(torch.from_numpy(ids), torch.from_numpy(mask)).numpy().reshape(-1))
            embs["torch dense"].append(teacher(torch.from_numpy(ids), torch.from_numpy(mask)).numpy().reshape(-1))
    embs = {k: np.stack(v) for k, v in embs.items()}

    def cos(a, b):
        c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return {"mean": round(float(c.mean()), 6), "min": round(float(c.min()), 6)}

    res = {"sentences": len(held_out), "distillation_steps": steps, "distillation_seconds": round(ft_s, 1),
           "cosine": {"int8_vs_fp32_sparse": cos(embs["ember 1:16 int8"], embs["ember 1:16"]),
                      "fp32_sparse_vs_torch_sparse": cos(embs["ember 1:16"], embs["torch 1:16"]),
                      "fp32_sparse_vs_dense": cos(embs["ember 1:16"], embs["torch dense"]),
                      "int8_sparse_vs_dense": cos(embs["ember 1:16 int8"], embs["torch dense"])},
           "bytes": {k: cms[k].manifest["compression"]["sparsity"]["packed_bytes"]
                     for k in ("ember 1:16", "ember 1:16 int8")}}
    fns = {}
    for name, cm in cms.items():
        _, dev_inputs = cm._prepare((ids, mask), {})
        fns[name] = (lambda c=cm, d=dev_inputs: c.run_device(d))
    torch.set_num_threads(threads)
    with bench_lock():
        load = os.getloadavg()[0]
        res["median_ms_batch1_seq128"] = interleaved_medians(fns, rounds=6, per_round=5, warmup=3)
        res["load_avg_1min"] = [load, os.getloadavg()[0]]
    print(f"\n== MiniLM 1:16 ({steps} distillation steps), int8 vs fp32 sparse values, {len(held_out)} held-out "
          f"sentences ==\n  cosine {res['cosine']}\n  encoder Linears: fp32 values "
          f"{res['bytes']['ember 1:16'] / 2**20:.2f} MiB, int8 {res['bytes']['ember 1:16 int8'] / 2**20:.2f} MiB\n  "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in res["median_ms_batch1_seq128"].items()))
    return res


def _plot(linear: dict, path: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ms = linear["median_ms"]
    names = list(ms)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(names, [ms[k] for k in names], color=["#888" if "dense" in k else "#d62" for k in names])
    ax.set_xlabel("median ms (lower is better)")
    ax.set_title("fp32 Linear 4096x4096, batch 1, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="linear,digits,minilm")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (ember uses the target's cores)")
    ap.add_argument("--digits-steps", type=int, default=1200)
    ap.add_argument("--minilm-steps", type=int, default=150)
    ap.add_argument("--no-minilm-compile", action="store_true")
    ap.add_argument("--int8-minilm-steps", type=int, default=40,
                    help="minilm_int8 part: distillation steps of the 1:16 student before comparing int8 to fp32")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args()
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    import tvm

    result = {"benchmark": "sparse_bench", "date": datetime.date.today().isoformat(),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
              "tvm": tvm.__version__, "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    t0 = time.perf_counter()
    if "linear" in parts:
        result["linear"] = bench_linear(a.threads)
    if "digits" in parts:
        result["digits"] = bench_digits(a.threads, a.digits_steps)
    if "minilm" in parts:
        result["minilm"] = bench_minilm(a.threads, a.minilm_steps, not a.no_minilm_compile)
    if "conv" in parts:
        result["conv"] = bench_conv(a.threads)
    if "minilm_int8" in parts:
        result["minilm_int8"] = bench_minilm_int8(a.threads, a.int8_minilm_steps)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(a.out, exist_ok=True)
    full = set(parts) == {"linear", "digits", "minilm"}
    path = os.path.join(a.out, "sparse_bench.json" if full else f"sparse_bench_{'_'.join(parts)}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if "linear" in result:
        _plot(result["linear"], os.path.join(a.out, "sparse_bench_linear.png"))
    print(f"\nwrote {path} ({result['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
