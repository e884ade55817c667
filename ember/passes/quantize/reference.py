"""The fp32 model with taps: runs the unquantized graph and also returns every quantized layer's input.

Used for calibration (static activation ranges), for measuring each layer's error in the report, for Mixed's
per-layer sensitivity (the module takes the weights as arguments, so running it with fake-quantized weights
simulates weight-only quantization without recompiling), and for the fp32 outputs the end-to-end metric
compares against.

The module is compiled with ember's scheduled pipeline for the host CPU but *without* lifting the weight
transforms, so a weight can be swapped per run.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ...compiler.targets import resolve
from ...runtime.load import host_arch
from ...errors import ConfigError


def _flatten(out):
    if hasattr(out, "numpy"):
        return [out.numpy()]
    res = []
    for o in out:
        res.extend(_flatten(o))
    return res


def _runs_here(target) -> bool:
    """An LLVM target whose code this machine can execute (no mtriple, or one for this machine's arch)."""
    if target is None or target.kind.name != "llvm":
        return False
    mtriple = str(target.attrs.get("mtriple", "") or "")
    return not mtriple or mtriple.split("-")[0] == host_arch()


class Reference:
    def __init__(self, imported, sites, target):
        from ...compiler.pipeline import lower

        func = imported.mod["main"]
        self.n_in = int(func.attrs["num_input"])
        mod = relax.transform.ToNonDataflow()(tvm.IRModule({gv: f for gv, f in imported.mod.functions.items()}))
        func = mod["main"]
        # Distinct activation inputs (q, k and v projections share one), as they are after ToNonDataflow: map
        # each site's input to the var of the same name there.
        by_name = {}
        for block in func.body.blocks:
            for b in block.bindings:
                by_name[b.var.name] = b.var
        for p in func.params:
            by_name[p.name] = p
        self.tap_of_site, taps = [], []
        for s in sites:
            if s.kind not in ("matmul", "conv2d"):
                self.tap_of_site.append(None)
                continue
            v = by_name.get(s.x.name) if isinstance(s.x, relax.Var) else None
            if v is None:
                raise ConfigError(f"quantization: cannot observe the input of layer '{s.name}'")
            if not any(v.same_as(t) for t in taps):
                taps.append(v)
            self.tap_of_site.append([i for i, t in enumerate(taps) if v.same_as(t)][0])
        ret = func.body.body
        fields = [ret] + taps
        body = relax.BlockBuilder().normalize(relax.SeqExpr(func.body.blocks, relax.Tuple(fields)))
        func = relax.Function(func.params, body, None, func.is_pure, func.attrs)  # return type inferred
        mod["main"] = func
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.CanonicalizeBindings()])(mod)
        # The reference runs here, on this CPU: a cross target (arm64 artifacts built on x86) gets the host's.
        host = target if _runs_here(target) else resolve("host")[1]
        with host:
            ex = tvm.compile(mod, host, relax_pipeline=lower(host))
        self.vm = relax.VirtualMachine(ex, tvm.cpu())
        self.n_taps = len(taps)
        self.weights = [np.ascontiguousarray(p) for p in imported.params]
        self._dev_weights = [tvm.runtime.tensor(p, tvm.cpu()) for p in self.weights]

    def run(self, inputs, weights: dict | None = None):
        """Run one batch; ``weights`` {index: array} overrides some weights. Returns (outputs, taps)."""
        dev = tvm.cpu()
        w = list(self._dev_weights)
        for i, arr in (weights or {}).items():
            w[i] = tvm.runtime.tensor(np.ascontiguousarray(arr, dtype=self.weights[i].dtype), dev)
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs] + w
        out = self.vm["main"](*args)
        outputs = _flatten(out[0])
        taps = [out[1 + i].numpy() for i in range(self.n_taps)]
        return outputs, taps

    def site_tensor(self, taps, site_index: int):
        """The input of a site from one batch's taps, in its own shape (conv2d: [B, C, H, W])."""
        t = self.tap_of_site[site_index]
        return None if t is None else taps[t]

    def site_input(self, taps, site_index: int, k: int):
        """The 2-D [M, K] input of a matmul site from one batch's taps."""
        t = self.tap_of_site[site_index]
        return None if t is None else taps[t].reshape(-1, k)
