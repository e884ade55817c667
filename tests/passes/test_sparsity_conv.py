"""N:M sparse convolutions (ember.passes.sparsity.conv): equal to torch's conv on the pruned weights."""

import numpy as np
import pytest
import torch
from torch import nn

import ember
import ember.sparsity as sp
from ember.compiler.targets import resolve
from ember.passes.sparsity.pack import nm_mask, pack
from ember.passes.sparsity.conv import conv_offsets
from ember.passes.sparsity.sparse_matmul import gather_isa


class Convs(nn.Module):
    """Padding on every side, asymmetric padding with stride 2 (the gather kernel), stride 1 with output rows of
    21 and 8 pixels (the row-vector kernel's full and tail tiles), a 1x3 dilated kernel, channels not a multiple of 16
    (padded last block), a reduction (C·kh·kw) not a multiple of 16 (partial last group), a Linear after."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 20, 3, padding=1)
        self.c2 = nn.Conv2d(20, 37, 3, stride=2, padding=(1, 2))
        self.c3 = nn.Conv2d(37, 16, (1, 3), dilation=(1, 2))
        self.fc = nn.Linear(16 * 7 * 8, 10)

    def forward(self, x):
        y = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return self.fc(torch.flatten(y, 1))


def _host_has_gather():
    return gather_isa(resolve("host")[1], "float32") is not None


def _model(n, m):
    torch.manual_seed(0)
    model = Convs().eval()
    sp.prune_nm(model, n, m)
    return model


def test_offsets_point_at_the_kept_weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 3, 3, 3)).astype("float32")
    w2 = (w.reshape(20, -1) * nm_mask(w.reshape(20, -1), 1, 16))
    p = pack(w2, 1, 16)
    offs = conv_offsets(p, 3, 3, 3, 10, 12)
    x = rng.standard_normal((3, 10, 12)).astype("float32")
    # one output pixel at the corner: sum over kept weights of value * x[offset] == the dense dot product
    vals = p.values.transpose(0, 3, 1, 2).reshape(-1, p.values.shape[1] * p.values.shape[2])[:20]
    got = (vals * x.reshape(-1)[offs.transpose(0, 3, 1, 2).reshape(vals.shape[0] + 12, -1)[:20]]).sum(1)
    np.testing.assert_allclose(got, (w2.reshape(20, 3, 3, 3) * x[None, :, :3, :3]).sum((1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("n,m,mcpu", [(1, 16, None), (2, 8, None), (1, 16, "haswell")])
def test_sparse_convs_match_torch(n, m, mcpu):
    """The host's kernels (AVX-512 here), and the AVX2 ones (8-wide vectors, two passes per channel block)."""
    import tvm

    if not _host_has_gather():
        pytest.skip("this CPU has no AVX2/AVX-512 gather: convolutions stay dense")
    target = "host" if mcpu is None else tvm.target.Target({"kind": "llvm", "num-cores": 2, "mcpu": mcpu})
    model = _model(n, m)
    x = torch.randn(2, 3, 13, 21)
    cm = ember.compile(model, (x,), target=target, sparsity=ember.NM(n, m), dynamic_batch=True)
    rep = cm.manifest["compression"]["sparsity"]
    convs = [layer for layer in rep["layers"] if layer["op"] == "conv2d"]
    assert [layer["name"] for layer in convs] == ["p_c1_weight", "p_c2_weight", "p_c3_weight"]
    assert "row vectors (horizontal stride 1) or gathers" in rep["kernel"] and not rep["skipped"]
    assert rep["packed_bytes"] < rep["dense_bytes"] / (2 if m == 16 else 1.2)
    for b in (2, 3):
        xb = torch.randn(b, 3, 13, 21)
        np.testing.assert_allclose(cm(xb.numpy()), model(xb).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_targets_without_gather_keep_convs_dense():
    import tvm

    model = _model(1, 16)
    x = torch.randn(1, 3, 13, 21)
    generic = tvm.target.Target({"kind": "llvm", "num-cores": 2})  # plain x86-64: no AVX2
    cm = ember.compile(model, (x,), target=generic, sparsity=ember.NM(1, 16))
    rep = cm.manifest["compression"]["sparsity"]
    assert [layer["name"] for layer in rep["layers"]] == ["p_fc_weight"]
    assert len(rep["skipped"]) == 3 and "AVX2 or AVX-512" in rep["skipped"][0]["reason"]
    np.testing.assert_allclose(cm(x.numpy()), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width", [1, 17])
def test_one_pixel_tails(width):
    """Output rows of 1 and 17 pixels: the row kernel's last tile is a single (scalar) pixel."""
    if not _host_has_gather():
        pytest.skip("this CPU has no AVX2/AVX-512 gather: convolutions stay dense")
    torch.manual_seed(width)
    conv = nn.Conv2d(4, 24, 3, padding=1).eval()
    sp.prune_nm(conv, 1, 16)
    x = torch.randn(1, 4, 5, width)
    cm = ember.compile(conv, (x,), sparsity=ember.NM(1, 16))
    assert [layer["op"] for layer in cm.manifest["compression"]["sparsity"]["layers"]] == ["conv2d"]
    np.testing.assert_allclose(cm(x.numpy()), conv(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_batch_norm_after_a_sparse_conv_is_folded_into_it():
    """conv -> BN and conv(+bias) -> BN: BN's scale goes into the packed weights (zeros stay zeros), its shift
    into one add — no BN arithmetic left at run time (ember's FoldBatchNorm runs later and cannot see the kernel)."""
    if not _host_has_gather():
        pytest.skip("this CPU has no AVX2/AVX-512 gather: convolutions stay dense")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 20, 3, padding=1), nn.BatchNorm2d(20)).eval()
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    sp.prune_nm(model, 1, 16)
    x = torch.randn(2, 3, 9, 9)
    cm = ember.compile(model, (x,), sparsity=ember.NM(1, 16))
    layers = cm.manifest["compression"]["sparsity"]["layers"]
    assert [layer.get("folded_batch_norm") for layer in layers] == [True, True]
    ops = {op for kern in cm.manifest["kernels"]["ember"]["kernels"] for op in kern["ops"]}
    assert not ops & {"batch_norm", "subtract", "divide", "rsqrt", "sqrt"}, ops
    np.testing.assert_allclose(cm(x.numpy()), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_a_conv_left_dense_by_the_user_stays_dense():
    """prune_nm(..., skip=("c1",)) keeps the first conv dense: ember must not prune it behind the user's back."""
    if not _host_has_gather():
        pytest.skip("this CPU has no AVX2/AVX-512 gather: every convolution stays dense")
    torch.manual_seed(0)
    model = Convs().eval()
    sp.prune_nm(model, 1, 16, skip=("c1",))
    x = torch.randn(1, 3, 13, 21)
    cm = ember.compile(model, (x,), sparsity=ember.NM(1, 16))
    rep = cm.manifest["compression"]["sparsity"]
    assert [s["name"] for s in rep["skipped"]] == ["p_c1_weight"] and "kept dense" in rep["skipped"][0]["reason"]
    assert "p_c1_weight" not in [layer["name"] for layer in rep["layers"]] and not rep["warnings"]
    np.testing.assert_allclose(cm(x.numpy()), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
