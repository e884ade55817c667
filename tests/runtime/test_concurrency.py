"""One loaded module called from 8 threads at once, each with its own inputs (and its own batch size).

What is shared and what is per call (module.py's docstring says the same, and these tests check it):
shared — the library and the weights (one list of tensors, loaded once); per thread — a Relax VM; per call —
the inputs, the outputs and the intermediate buffers (from TVM's pooled allocator).
"""

import os
import threading

import numpy as np
import psutil
import pytest
import torch
from conftest import assert_close
from models import MLP, TinyTransformer, seeded

import ember

THREADS = 8


def _hammer(model, inputs_per_thread, refs_per_thread, iterations, use_torch=()):
    """Run model from THREADS threads released together; returns the VM each thread used and any failures."""
    barrier = threading.Barrier(THREADS)
    failures, vms = [], [None] * THREADS

    def work(t):
        try:
            barrier.wait()
            args = inputs_per_thread[t]
            if t in use_torch:
                args = tuple(torch.from_numpy(a) for a in args)
            for i in range(iterations):
                out = model(*args)
                out = out.numpy() if isinstance(out, torch.Tensor) else out
                assert_close(out, refs_per_thread[t], what=f"thread {t} iteration {i}")
            vms[t] = model._vm()
        except BaseException as e:  # collected, so a failure in a thread fails the test
            failures.append(f"thread {t}: {e!r}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    return vms, failures


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    model = seeded(TinyTransformer)
    ids = torch.randint(0, 100, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.int64)
    path = ember.compile(model, (ids, mask), dynamic_batch=True).export(tmp_path_factory.mktemp("tt") / "a")
    return model, ember.load(path)


@pytest.mark.slow
def test_eight_threads_own_inputs_transformer(transformer):
    model, loaded = transformer
    gen = torch.Generator().manual_seed(0)
    inputs, refs = [], []
    for t in range(THREADS):
        batch = t + 1  # every thread a different batch size: per-call buffers must not be shared
        ids = torch.randint(0, 100, (batch, 16), generator=gen)
        mask = torch.ones(batch, 16, dtype=torch.int64)
        mask[:, 16 - t:] = 0  # and different padding
        with torch.no_grad():
            refs.append(model(ids, mask).numpy())
        inputs.append((ids.numpy(), mask.numpy()))
    # Before any call: the weights are not on any VM yet, and no thread has one.
    vms, failures = _hammer(loaded, inputs, refs, iterations=40, use_torch={1, 4})
    assert not failures, failures[:3]
    # One VM per thread (VMs hold registers/frames while running, so they cannot be shared) ...
    assert len({id(v) for v in vms}) == THREADS
    assert loaded._vm() is not None and id(loaded._vm()) not in {id(v) for v in vms}
    # ... and one list of weights for all of them.
    assert len(loaded._params) == loaded.manifest["params"]["count"]


@pytest.mark.slow
def test_weights_are_not_copied_per_thread(tmp_path):
    """RSS growth from 8 threads calling at once is far below one more copy of the weights."""
    model = seeded(MLP, 512, 2048, 10)  # 21 MB of weights: a copy per thread would add 168 MB
    path = ember.compile(model, (torch.randn(2, 512),), dynamic_batch=True).export(tmp_path / "mlp")
    loaded = ember.load(path)
    weight_bytes = loaded.manifest["params"]["bytes"]
    x = np.random.default_rng(0).standard_normal((THREADS, 4, 512)).astype(np.float32)
    with torch.no_grad():
        refs = [model(torch.from_numpy(x[t])).numpy() for t in range(THREADS)]
    proc = psutil.Process(os.getpid())
    read_from_file = list(loaded._raw_params)
    assert_close(loaded(x[0]), refs[0])  # the first call places the weights
    # On CPU the tensors read from params.bin are used as they are: no second copy of the weights, ever.
    assert len(loaded._params) == len(read_from_file)
    assert all(a is b for a, b in zip(loaded._params, read_from_file))
    del read_from_file
    before = proc.memory_info().rss
    vms, failures = _hammer(loaded, [(x[t],) for t in range(THREADS)], refs, iterations=50)
    assert not failures, failures[:3]
    grew = proc.memory_info().rss - before
    assert grew < weight_bytes / 2, f"RSS grew {grew / 2**20:.1f} MiB running 8 threads; weights are " \
                                    f"{weight_bytes / 2**20:.1f} MiB — are they copied per thread?"
