"""DropMatmulBroadcast: a linear on a non-contiguous 3-D input must not store its weight once per batch element."""

import numpy as np
import pytest
import torch
from tvm import relax

from conftest import assert_close
from ember.frontends.torch import import_torch
from ember.passes.relax_util import is_call


class HeadsThenLinear(torch.nn.Module):
    """transformers' SDPA attention output: sdpa -> transpose -> reshape [B, S, -1] -> Linear. The SDPA output's
    strides make the linear a non-contiguous 3-D matmul, which torch decomposes to expand + bmm: TVM's importer
    then emits broadcast_to of the input and of the weight."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(24, 20)

    def forward(self, x):
        b, _, s, _ = x.shape
        o = torch.nn.functional.scaled_dot_product_attention(x, x, x)
        return self.proj(o.transpose(1, 2).reshape(b, s, -1))


def _broadcasts_into_matmul(mod) -> int:
    func = mod["main"]
    bound = {}
    n = [0]

    def _visit(e):
        if isinstance(e, relax.VarBinding):
            bound[e.var] = e.value

    for block in func.body.blocks:
        for b in block.bindings:
            _visit(b)
    for v in bound.values():
        if is_call(v, "relax.matmul"):
            n[0] += sum(1 for a in v.args if is_call(bound.get(a), "relax.broadcast_to"))
    return n[0]


def _model_and_input(batch):
    torch.manual_seed(0)
    return HeadsThenLinear().eval(), torch.randn(batch, 4, 7, 6)


def test_importer_pattern_is_rewritten():
    model, x = _model_and_input(8)
    # The pattern exists in what TVM's importer makes (otherwise this test proves nothing) ...
    from tvm.relax.frontend.torch import from_exported_program

    from ember.frontends.torch import _export

    raw = from_exported_program(_export(model, (x,), False), keep_params_as_input=True)
    assert _broadcasts_into_matmul(raw) >= 1
    # ... and ember's import removes it.
    assert _broadcasts_into_matmul(import_torch(model, (x,)).mod) == 0


@pytest.mark.parametrize("batch", [1, 8])
def test_compiled_equals_torch_and_params_do_not_grow_with_batch(batch, tmp_path):
    import ember

    model, x = _model_and_input(batch)
    cm = ember.compile(model, (x,), target="host")
    with torch.no_grad():
        ref = model(x).numpy()
    assert_close(cm(x.numpy()), ref, what=f"batch {batch}")
    art = cm.export(tmp_path / "art")
    params = (art / "params.bin").stat().st_size if hasattr(art, "stat") else \
        __import__("os").path.getsize(f"{art}/params.bin")
    # weight 20x24 + bias 20, fp32, whatever the layout: far below one copy per batch element
    assert params < 4 * (20 * 24 + 20) * 2, f"params.bin is {params} bytes at batch {batch}"


def test_dynamic_batch_keeps_working():
    import ember

    model, x = _model_and_input(3)
    cm = ember.compile(model, (x,), target="host", dynamic_batch=True)
    for b in (1, 5):
        xb = torch.randn(b, 4, 7, 6)
        with torch.no_grad():
            assert_close(cm(xb.numpy()), model(xb).numpy(), what=f"dynamic batch {b}")


def test_broadcast_that_changes_the_result_is_kept():
    """Both operands broadcast from batch 1 to 3: dropping both would shrink the result, so one must stay."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType([1, 4, 5], "float32"))
    w = relax.Var("w", relax.TensorType([1, 5, 6], "float32"))
    with bb.function("main", [a, w]):
        with bb.dataflow():
            ab = bb.emit(relax.op.broadcast_to(a, [3, 4, 5]))
            wb = bb.emit(relax.op.broadcast_to(w, [3, 5, 6]))
            y = bb.emit_output(relax.op.matmul(ab, wb))
        bb.emit_func_output(y)
    from ember.passes.matmul_broadcast import DropMatmulBroadcast

    mod = DropMatmulBroadcast(bb.get())
    assert [int(d) for d in mod["main"].ret_ty.shape.values] == [3, 4, 6]
    ex = relax.build(mod, "llvm")
    import tvm

    vm = relax.VirtualMachine(ex, tvm.cpu())
    an, wn = np.random.rand(1, 4, 5).astype("float32"), np.random.rand(1, 5, 6).astype("float32")
    out = vm["main"](tvm.runtime.tensor(an), tvm.runtime.tensor(wn)).numpy()
    assert_close(out, np.broadcast_to(an @ wn, (3, 4, 6)))
