"""ember.sparsity on the torch side: masks, fine-tuning that keeps them, channel pruning that keeps models running."""

import copy

import numpy as np
import pytest
import torch

import ember
import ember.sparsity as sp
from conftest import assert_close
from ember.errors import ConfigError
from models import CNN, MLP, randomize_bn


class SmallNet(torch.nn.Module):
    """conv → BN → relu → conv → relu → flatten → linear → linear: every layer but the last is prunable."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 16, 3)
        self.fc, self.out = torch.nn.Linear(16 * 4 * 4, 32), torch.nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        return self.out(torch.relu(self.fc(torch.flatten(y, 1))))


def test_prune_nm_and_magnitude():
    torch.manual_seed(0)
    model = SmallNet()
    masks = sp.prune_nm(model, 1, 16)
    assert set(masks) == {"c1.weight", "c2.weight", "fc.weight", "out.weight"}
    assert all(sp.check_nm(model, 1, 16).values())
    rep = {r["name"]: r["sparsity"] for r in sp.sparsity_report(model)}
    assert rep["fc.weight"] == pytest.approx(15 / 16)
    assert rep["c1.weight"] == pytest.approx(8 / 9)  # in·kh·kw = 9 < 16: one group, one weight kept
    model2 = MLP()
    sp.prune_magnitude(model2, 0.75, layers=["fc1"])
    w = model2.fc1.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.75, abs=1e-3)
    assert float((model2.fc2.weight == 0).float().mean()) == 0.0
    with pytest.raises(ConfigError, match="no such module"):
        sp.prune_nm(model2, 2, 4, layers=["nope"])
    with pytest.raises(ConfigError):
        sp.prune_magnitude(model2, 1.5)


def test_finetune_keeps_nm_masks_and_learns():
    torch.manual_seed(1)
    teacher = MLP(32, 64, 10).eval()
    student = copy.deepcopy(teacher)
    masks = sp.prune_nm(student, 1, 8)
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    data = [torch.randn(32, 32) for _ in range(4)]
    losses = sp.finetune(student, masks, data, teacher=teacher, steps=60, lr=3e-3, weight_decay=0.01)
    assert len(losses) == 60 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all(sp.check_nm(student, 1, 8, masks).values())
    for name, mask in masks.items():
        w = dict(student.named_parameters())[name]
        assert (w[~mask] == 0).all()                       # pruned stay exactly zero (weight decay included)
        assert not torch.equal(w[mask], before[name][mask])  # kept ones learned
    with pytest.raises(ConfigError, match="no such parameter"):
        sp.finetune(student, {"nope.weight": masks["fc1.weight"]}, data, teacher=teacher, steps=1)


def test_finetune_with_labels_and_a_loss():
    torch.manual_seed(2)
    model = MLP(32, 64, 4)
    masks = sp.prune_nm(model, 2, 4)
    x = torch.randn(64, 32)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    losses = sp.finetune(model, masks, [(x, y)], steps=40, lr=1e-2, loss=torch.nn.functional.nll_loss)
    assert losses[-1] < losses[0]
    assert all(sp.check_nm(model, 2, 4, masks).values())


@pytest.mark.slow
def test_channel_pruning_runs_and_matches_its_torch_twin():
    torch.manual_seed(3)
    model = randomize_bn(SmallNet()).eval()
    x = torch.randn(2, 1, 8, 8)
    pruned, rep = sp.prune_channels(model, (x,), amount=0.5)
    by = {r["name"]: r for r in rep["layers"]}
    assert by["c1"]["channels_after"] == 4 and by["c2"]["channels_after"] == 8 and by["fc"]["channels_after"] == 16
    assert not by["out"]["pruned"]  # feeds the model output
    assert pruned.c2.in_channels == 4 and pruned.fc.in_features == 8 * 16 and pruned.bn.num_features == 4
    assert rep["params_after"] < rep["params_before"] / 2
    assert model.c1.out_channels == 8  # the original is untouched
    cm = ember.compile(pruned, (x,))
    assert_close(cm(x).numpy(), pruned(x).detach().numpy())
    # residual CNN: only the convs inside blocks can shrink; the rest is refused with a reason
    cnn = randomize_bn(CNN()).eval()
    xc = torch.randn(2, 3, 16, 16)
    pcnn, rep = sp.prune_channels(cnn, (xc,), amount=0.5)
    pruned_names = {r["name"] for r in rep["layers"] if r["pruned"]}
    assert pruned_names == {"blocks.0.conv1", "blocks.1.conv1", "blocks.2.conv1"}
    assert any("add" in r.get("reason", "") for r in rep["layers"])
    cm = ember.compile(pcnn, (xc,))
    assert_close(cm(xc).numpy(), pcnn(xc).detach().numpy())


def test_channel_pruning_then_nm_sparsity_compiles():
    """Structured and N:M together: smaller layers, and the linears run on the sparse kernel."""
    torch.manual_seed(4)
    model = MLP(64, 128, 10).eval()
    x = torch.randn(3, 64)
    pruned, _ = sp.prune_channels(model, (x,), amount=0.25)
    assert pruned.fc1.out_features == 96 and pruned.fc2.in_features == 96
    sp.prune_nm(pruned, 1, 16)
    cm = ember.compile(pruned, (x,), sparsity=ember.NM(1, 16))
    assert_close(cm(x).numpy(), pruned(x).detach().numpy())
