"""Pruning masks and channel surgery on torch models (the public face is :mod:`ember.sparsity`).

* :func:`magnitude_mask` — unstructured: zero the smallest-|w| fraction of a tensor.
* :func:`nm_mask` — N:M along the reduction axis: for ``Linear`` ``[out, in]`` groups run along ``in``; for
  ``Conv2d`` ``[out, in, kh, kw]`` along the flattened ``in·kh·kw`` (the order im2col reads them in), so the
  compiled kernels can skip the same zeros.
* :func:`prune_channels` — structured: removes whole output channels of a Conv2d/Linear and the matching input
  channels of every layer that reads them (through BatchNorm, activations, pooling and ``flatten``), found by
  tracing the model with ``torch.fx``. A layer whose output also feeds a residual add, a concatenation or the
  model's output is left alone (removing its channels would break the shape that the other branch must match).
"""

from __future__ import annotations

import copy

from ...errors import ConfigError


def _torch():
    import torch

    return torch


def magnitude_mask(w, sparsity: float):
    """Bool mask (same shape) that keeps the largest ``1 - sparsity`` fraction of ``|w|``."""
    torch = _torch()
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"sparsity={sparsity!r}: use a fraction in [0, 1), e.g. 0.5")
    k = int(round(float(sparsity) * w.numel()))
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    flat = w.detach().abs().flatten()
    # kthvalue is the k-th smallest; ties at the threshold are resolved by index so exactly k are removed.
    order = torch.argsort(flat, stable=True)
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[order[:k]] = False
    return mask.view_as(w)


def nm_mask(w, n: int, m: int):
    """Bool mask keeping the ``n`` largest |w| of every ``m`` consecutive weights along the reduction axis.

    ``w``: ``[out, in]`` or ``[out, in, kh, kw]`` (flattened to ``[out, in·kh·kw]``). A last partial group (the
    reduction size not a multiple of m) keeps at most ``n`` as well.
    """
    torch = _torch()
    if not (isinstance(m, int) and 2 <= m <= 256 and isinstance(n, int) and 1 <= n < m):
        raise ConfigError(f"N:M = {n}:{m}: use integers with 1 ≤ n < m ≤ 256, e.g. 2:4 or 1:16")
    if w.dim() < 2:
        raise ConfigError(f"nm_mask needs a weight with a reduction axis ([out, in, ...]); got shape {tuple(w.shape)}")
    flat = w.detach().reshape(w.shape[0], -1)
    rows, k = flat.shape
    g = -(-k // m)
    score = torch.full((rows, g * m), -1.0, dtype=torch.float32)  # padding loses to every real weight
    score[:, :k] = flat.abs().float()
    score = score.view(rows, g, m)
    top = torch.topk(score, n, dim=-1, sorted=False).indices
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
    return keep.view(rows, g * m)[:, :k].reshape(w.shape)


def is_nm(w, n: int, m: int) -> bool:
    """Whether every group of ``m`` along the reduction axis holds at most ``n`` non-zeros."""
    torch = _torch()
    flat = w.detach().reshape(w.shape[0], -1)
    rows, k = flat.shape
    g = -(-k // m)
    nz = torch.zeros((rows, g * m), dtype=torch.int32)
    nz[:, :k] = (flat != 0).int()
    return bool((nz.view(rows, g, m).sum(-1) <= n).all())


# ---------------------------------------------------------------------------------------------------------------
# Channel pruning
# ---------------------------------------------------------------------------------------------------------------
_CHANNELWISE_MODULES = ("ReLU", "ReLU6", "GELU", "SiLU", "Sigmoid", "Tanh", "LeakyReLU", "Hardswish", "Hardtanh",
                        "ELU", "Mish", "Dropout", "Dropout2d", "Identity", "MaxPool2d", "AvgPool2d",
                        "AdaptiveAvgPool2d", "AdaptiveMaxPool2d")


def _channelwise_function(target) -> bool:
    torch = _torch()
    F = torch.nn.functional
    fns = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.leaky_relu, F.hardswish,
           F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.sigmoid}
    return target in fns


def _is_flatten(node) -> bool:
    torch = _torch()
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    return False


def _prunable_layer(mod) -> bool:
    torch = _torch()
    return isinstance(mod, torch.nn.Linear) or (isinstance(mod, torch.nn.Conv2d) and mod.groups == 1)


class _Plan:
    """What pruning one producer touches: its BNs, and its consumers with the feature-expansion factor."""

    def __init__(self, name):
        self.name = name
        self.bns: list[str] = []
        self.consumers: list[tuple[str, int]] = []  # (module name, features per channel: >1 after flatten)
        self.blocked: str | None = None


def _trace_plan(gm, name, node, modules) -> _Plan:
    torch = _torch()
    plan = _Plan(name)
    # Walk forward from the producer through ops that act on each channel separately.
    frontier = [(node, 1)]
    seen = set()
    while frontier and plan.blocked is None:
        cur, factor = frontier.pop()
        for user in cur.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module":
                mod = modules[user.target]
                kind = type(mod).__name__
                if isinstance(mod, torch.nn.BatchNorm2d) or isinstance(mod, torch.nn.BatchNorm1d):
                    plan.bns.append(user.target)
                    frontier.append((user, factor))
                elif kind in _CHANNELWISE_MODULES:
                    frontier.append((user, factor))
                elif _prunable_layer(mod) and user.args and user.args[0] is cur:
                    plan.consumers.append((user.target, factor))
                else:
                    plan.blocked = f"its output feeds {user.target} ({kind})"
            elif user.op == "call_function" and _channelwise_function(user.target) and user.args[0] is cur:
                frontier.append((user, factor))
            elif _is_flatten(user):
                shape = cur.meta.get("tensor_meta")
                if shape is None or len(shape.shape) < 2:
                    plan.blocked = "flatten of an input whose shape is unknown"
                    break
                spatial = 1
                for d in shape.shape[2:]:
                    spatial *= int(d)
                frontier.append((user, factor * spatial))
            else:
                what = user.target if user.op != "output" else "the model output"
                plan.blocked = f"its output feeds {getattr(what, '__name__', what)} (not channel-wise)"
    if plan.blocked is None and not plan.consumers:
        plan.blocked = "no layer reads its output channels"
    return plan


def _keep_channels(layer, bns, modules, amount: float):
    torch = _torch()
    w = layer.weight.detach()
    score = w.abs().reshape(w.shape[0], -1).sum(1)
    for bn_name in bns:  # a BN that scales a channel down makes it matter less
        bn = modules[bn_name]
        if bn.affine and bn.track_running_stats:
            score = score * (bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps))
    out = w.shape[0]
    keep_n = max(1, out - int(round(float(amount) * out)))
    keep = torch.topk(score, keep_n).indices.sort().values
    return keep


def _slice_param(p, idx, dim):
    torch = _torch()
    return torch.nn.Parameter(p.detach().index_select(dim, idx).clone(), requires_grad=p.requires_grad)


def prune_channels(model, example_inputs, amount: float = 0.5, layers=None):
    """Remove ``amount`` of the output channels (lowest L1 norm, times the BN scale) of every prunable layer.

    Returns ``(pruned_model, report)``: a new model (the input is not modified) whose Conv2d/Linear/BatchNorm
    layers are physically smaller, and per layer the channels before/after or why it was left alone.
    ``layers``: names of the layers to prune (default: every prunable one).
    """
    torch = _torch()
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    if not 0.0 <= float(amount) < 1.0:
        raise ConfigError(f"amount={amount!r}: use the fraction of channels to remove, in [0, 1)")
    model = copy.deepcopy(model).eval()
    params_before = sum(int(p.numel()) for p in model.parameters())
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    try:
        gm = symbolic_trace(model)
    except Exception as e:  # data-dependent control flow etc.
        raise ConfigError(f"prune_channels could not trace {type(model).__name__} with torch.fx ({e}); "
                          "prune a traceable submodule instead") from e
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    modules = dict(model.named_modules())
    calls: dict[str, list] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    wanted = set(layers) if layers is not None else None
    if wanted is not None:
        unknown = wanted - set(modules)
        if unknown:
            raise ConfigError(f"layers={sorted(unknown)}: no such module in {type(model).__name__}")
    plans = []
    report = {"amount": float(amount), "layers": []}
    for name, nodes in calls.items():
        mod = modules[name]
        if not _prunable_layer(mod) or (wanted is not None and name not in wanted):
            continue
        if len(nodes) > 1:
            report["layers"].append({"name": name, "pruned": False, "reason": "module called more than once"})
            continue
        plan = _trace_plan(gm, name, nodes[0], modules)
        if plan.blocked:
            report["layers"].append({"name": name, "pruned": False, "reason": plan.blocked})
            continue
        plans.append(plan)
    # Decide every producer's kept channels from the original weights, then cut (a layer can be both a producer
    # and a consumer: its output rows and its input columns are cut independently).
    keeps = {p.name: _keep_channels(modules[p.name], p.bns, modules, amount) for p in plans}
    with torch.no_grad():
        for plan in plans:
            keep = keeps[plan.name]
            layer = modules[plan.name]
            before = layer.weight.shape[0]
            layer.weight = _slice_param(layer.weight, keep, 0)
            if layer.bias is not None:
                layer.bias = _slice_param(layer.bias, keep, 0)
            if isinstance(layer, torch.nn.Conv2d):
                layer.out_channels = len(keep)
            else:
                layer.out_features = len(keep)
            for bn_name in plan.bns:
                bn = modules[bn_name]
                if bn.affine:
                    bn.weight = _slice_param(bn.weight, keep, 0)
                    bn.bias = _slice_param(bn.bias, keep, 0)
                if bn.track_running_stats:
                    bn.running_mean = bn.running_mean.index_select(0, keep).clone()
                    bn.running_var = bn.running_var.index_select(0, keep).clone()
                bn.num_features = len(keep)
            for cname, factor in plan.consumers:
                consumer = modules[cname]
                cols = keep if factor == 1 else (keep[:, None] * factor + torch.arange(factor)[None, :]).flatten()
                consumer.weight = _slice_param(consumer.weight, cols, 1)
                if isinstance(consumer, torch.nn.Conv2d):
                    consumer.in_channels = len(cols)
                else:
                    consumer.in_features = len(cols)
            report["layers"].append({"name": plan.name, "pruned": True, "channels_before": int(before),
                                     "channels_after": int(len(keep)), "bn": plan.bns,
                                     "consumers": [c for c, _ in plan.consumers]})
    report.update({"params_before": params_before, "params_after": sum(int(p.numel()) for p in model.parameters())})
    return model, report
