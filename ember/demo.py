"""``make demo`` / ``ember demo``: the main job on the bundled default model, end to end.

Compiles the real all-MiniLM-L6-v2 for this machine's CPU, writes the artifact, loads it back with the runtime
path users deploy with, embeds real sentences and prints latency next to PyTorch's and the agreement of the
embeddings with PyTorch's.
"""

from __future__ import annotations

import os
import time

import numpy as np

SENTENCES = 8


def _torch_latency(encoder, ids, mask, repeat=30):
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(5):
            encoder(ids, mask)
        for _ in range(repeat):
            t0 = time.perf_counter()
            encoder(ids, mask)
            times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def run_demo(out_dir: str = "artifacts/all-MiniLM-L6-v2"):
    import torch

    import ember

    from .models import minilm
    from .models.corpus import stdlib_sentences
    from .runtime.artifact import MANIFEST

    print(f"ember {ember.__version__} demo: {minilm.NAME}, batch 1, seq {minilm.SEQ_LEN}, fp32, target host")
    t0 = time.perf_counter()
    cm, encoder = minilm.compile_encoder(target="host")
    print(f"  compiled in {time.perf_counter() - t0:.1f} s")
    # The demo owns this path: it replaces an earlier demo artifact, never anything else.
    overwrite = os.path.isfile(os.path.join(out_dir, MANIFEST))
    path = cm.export(out_dir, overwrite=overwrite)
    model = ember.load(path)
    print(f"  artifact {path} (model.so + params.bin + manifest.json), loaded back with ember.load")

    tok = minilm.load_tokenizer()
    sentences = stdlib_sentences(SENTENCES)
    cosines = []
    ours_all = []
    for s in sentences:
        ids, mask = minilm.tokenize(tok, [s])
        ours = model(ids, mask)
        with torch.inference_mode():
            ref = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        cosines.append(float((ours * ref).sum() / (np.linalg.norm(ours) * np.linalg.norm(ref))))
        ours_all.append(ours[0])
    ids, mask = minilm.tokenize(tok, sentences[:1])
    bench = model.benchmark(ids, mask, repeat=30)
    torch_ms = _torch_latency(encoder, torch.from_numpy(ids), torch.from_numpy(mask))

    print(f"\n  {len(sentences)} real sentences (first sentences of Python stdlib docstrings):")
    for s, c in zip(sentences, cosines):
        print(f"    cos(ember, torch) = {c:.6f}  {s[:70]}{'…' if len(s) > 70 else ''}")
    emb = np.stack(ours_all)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -1)
    i, j = np.unravel_index(np.argmax(sim), sim.shape)
    print(f"\n  most similar pair by ember's embeddings ({sim[i, j]:.3f}):\n    {sentences[i]}\n    {sentences[j]}")
    print("\n  latency, batch 1, seq 128 (median):")
    print(f"    PyTorch eager {torch_ms:8.2f} ms   ({torch.get_num_threads()} threads)")
    print(f"    ember         {bench.median_ms:8.2f} ms   ({bench})")
    print(f"    ratio ember / PyTorch = {bench.median_ms / torch_ms:.2f}")
    print(f"  embedding agreement: min cosine {min(cosines):.6f}, mean {np.mean(cosines):.6f}")
    if min(cosines) < 0.999:
        raise SystemExit("demo: embeddings disagree with PyTorch (cosine < 0.999)")
