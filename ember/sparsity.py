"""Pruning and sparsity-aware fine-tuning on the PyTorch side: prune → fine-tune (distil) → ``ember.compile``.

    import ember, ember.sparsity as sp
    teacher = copy.deepcopy(model)
    masks = sp.prune_nm(model, 1, 16)                     # Linear + Conv2d weights, along the reduction axis
    sp.finetune(model, masks, batches, teacher=teacher, steps=300)   # masks stay fixed: still 1:16 after
    compiled = ember.compile(model, (x,), sparsity=ember.NM(1, 16))  # packed weights + the sparse kernel

Masks are dicts ``{parameter name: bool tensor}`` (True = kept). Also here: :func:`prune_magnitude`
(unstructured), :func:`prune_channels` (physically smaller layers), :func:`sparsity_report`.
"""

from __future__ import annotations

import itertools
import math

from .errors import ConfigError
from .passes.sparsity.prune import is_nm, magnitude_mask, nm_mask
from .passes.sparsity.prune import prune_channels as _prune_channels


def _layers(model, include_conv: bool, layers=None, skip=()):
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv2d) if include_conv else (torch.nn.Linear,)
    found = []
    names = dict(model.named_modules())
    if layers is not None:
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise ConfigError(f"layers={unknown}: no such module in {type(model).__name__}; "
                              f"choose among {[n for n, m in names.items() if isinstance(m, kinds)][:20]}")
    for name, mod in names.items():
        if not isinstance(mod, kinds) or name in skip or (layers is not None and name not in layers):
            continue
        if isinstance(mod, torch.nn.Conv2d) and mod.groups != 1:
            continue  # depthwise/grouped: each output sees only a few inputs; N:M of that is not meaningful
        found.append((name, mod))
    return found


def _weight_name(module_name: str) -> str:
    """The parameter name of a layer's weight ("weight" when the model is the layer itself)."""
    return f"{module_name}.weight" if module_name else "weight"


def apply_masks(model, masks) -> None:
    """Zero every masked weight in place (``masks``: {parameter name: bool tensor})."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in params:
                raise ConfigError(f"mask for {name!r}: the model has no such parameter")
            params[name].mul_(mask.to(params[name].dtype))


def prune_magnitude(model, sparsity: float = 0.5, *, include_conv: bool = True, layers=None, skip=()):
    """Unstructured magnitude pruning of each Linear (and Conv2d) weight to ``sparsity``; returns the masks."""
    masks = {_weight_name(name): magnitude_mask(mod.weight, sparsity)
             for name, mod in _layers(model, include_conv, layers, skip)}
    apply_masks(model, masks)
    return masks


def prune_nm(model, n: int, m: int, *, include_conv: bool = True, layers=None, skip=()):
    """N:M pruning (the ``n`` largest |w| of every ``m`` along the reduction axis) of each Linear (and Conv2d)
    weight, in place; returns the masks for :func:`finetune`."""
    masks = {_weight_name(name): nm_mask(mod.weight, n, m) for name, mod in _layers(model, include_conv, layers, skip)}
    apply_masks(model, masks)
    return masks


def check_nm(model, n: int, m: int, masks=None) -> dict:
    """{parameter name: whether it is n:m sparse} for the masked parameters (default: every Linear/Conv2d weight)."""
    params = dict(model.named_parameters())
    names = list(masks) if masks is not None else [_weight_name(nm) for nm, _ in _layers(model, True)]
    return {name: is_nm(params[name], n, m) for name in names}


def sparsity_report(model, masks=None) -> list[dict]:
    """Per weight: shape and the fraction of zeros."""
    params = dict(model.named_parameters())
    names = list(masks) if masks is not None else [_weight_name(nm) for nm, _ in _layers(model, True)]
    out = []
    for name in names:
        p = params[name]
        out.append({"name": name, "shape": list(p.shape), "sparsity": float((p == 0).float().mean())})
    return out


def prune_channels(model, example_inputs, amount: float = 0.5, layers=None):
    """Structured pruning: remove ``amount`` of each prunable layer's output channels, and the matching input
    channels downstream (BN included). Returns ``(smaller_model, report)``; see
    :func:`ember.passes.sparsity.prune.prune_channels`."""
    return _prune_channels(model, example_inputs, amount=amount, layers=layers)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning with fixed masks
# ---------------------------------------------------------------------------------------------------------------
def _as_args(batch):
    if isinstance(batch, dict):
        raise ConfigError("finetune: give batches as tensors or tuples of tensors in forward()'s order")
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise ConfigError(f"finetune: cannot find the output tensor in a {type(out).__name__}")


def distillation_loss(student, teacher, kind: str = "kl", temperature: float = 2.0):
    """kl: KL(teacher ‖ student) of the softened distributions × T² (logits); mse; cosine: 1 - cos per row
    (embeddings)."""
    import torch
    import torch.nn.functional as F

    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                        reduction="batchmean") * t * t
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=-1)).mean()
    if kind == "cosine+mse":
        return distillation_loss(student, teacher, "cosine") + distillation_loss(student, teacher, "mse")
    raise ConfigError(f"loss={kind!r}: use 'kl' (logits), 'mse', 'cosine' or 'cosine+mse' (embeddings), or pass a "
                      "callable loss(student_out, teacher_out_or_target)")


def finetune(model, masks, data, *, teacher=None, steps: int = 100, lr: float = 1e-4, loss="kl",
             temperature: float = 2.0, optimizer=None, weight_decay: float = 0.0, train_mode: bool = False,
             log_every: int = 0):
    """Sparsity-aware fine-tuning that keeps the masks: the pruned weights stay exactly zero throughout.

    model: the pruned torch model (trained in place). masks: from :func:`prune_nm` / :func:`prune_magnitude`.
    data: an iterable of batches, cycled until ``steps`` optimizer steps are done. With a ``teacher`` (usually
        the dense model before pruning) each batch is the model's inputs (a tensor or a tuple) and the loss is
        distillation from the teacher's outputs (``loss``: "kl" for logits, "mse"/"cosine"/"cosine+mse" for
        embeddings, or a callable). Without one, each batch is ``(inputs, target)`` and ``loss`` must be a callable
        ``loss(output, target)``.
    train_mode: False (default) keeps BatchNorm statistics and dropout frozen (eval mode) while the weights
        learn — what short recovery runs on little data need; True trains in train mode.
    How the masks are kept: each step the gradients of masked weights are multiplied by the mask before the
    optimizer step (so Adam's moments of pruned weights stay zero), and the masks are applied again after it (so
    weight decay or momentum cannot revive a pruned weight). Returns a list of the loss per step.
    """
    import torch

    if steps < 1:
        raise ConfigError(f"steps={steps!r}: use a positive number of optimizer steps")
    if teacher is None and not callable(loss):
        raise ConfigError("finetune without a teacher needs batches (inputs, target) and a callable loss")
    params = dict(model.named_parameters())
    for name in masks:
        if name not in params:
            raise ConfigError(f"mask for {name!r}: the model has no such parameter")
    masks = {name: mask.to(params[name].device) for name, mask in masks.items()}
    apply_masks(model, masks)
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=weight_decay)
    if teacher is not None:
        teacher.eval()
    model.train(train_mode)
    loss_fn = loss if callable(loss) else (lambda s, t: distillation_loss(s, t, loss, temperature))
    losses = []
    batches = itertools.cycle(data)
    for step in range(steps):
        batch = next(batches)
        if teacher is not None:
            args = _as_args(batch)
            with torch.no_grad():
                target = _first_tensor(teacher(*args))
        else:
            inputs, target = batch
            args = _as_args(inputs)
        out = _first_tensor(model(*args))
        value = loss_fn(out, target)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        with torch.no_grad():
            for name, mask in masks.items():
                g = params[name].grad
                if g is not None:
                    g.mul_(mask.to(g.dtype))
        optimizer.step()
        apply_masks(model, masks)
        v = float(value.detach())
        if not math.isfinite(v):
            raise ConfigError(f"finetune: the loss became {v} at step {step}; lower lr (now {lr})")
        losses.append(v)
        if log_every and (step + 1) % log_every == 0:
            print(f"finetune step {step + 1}/{steps}: loss {v:.5f}")
    model.eval()
    return losses


__all__ = ["magnitude_mask", "nm_mask", "is_nm", "apply_masks", "prune_magnitude", "prune_nm", "check_nm",
           "sparsity_report", "prune_channels", "finetune", "distillation_loss"]
