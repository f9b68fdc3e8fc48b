"""Soft extract (ALGORITHM.md §3): learn the retention configuration with retention vectors.

Every encoder layer l gets a learnable retention vector r_l in [0, 1]^N (N = the padded input
length). After the layer's attention sub-layer (output dense, residual, LayerNorm) and before
its feed-forward sub-layer, the n positions are ranked by this layer's significance scores
(ALGORITHM.md §1, from the layer's own attention probabilities before dropout; descending, ties
by the lower index) and the word vector of rank p is multiplied by r_l[p]. Nothing is removed
and the mask is unchanged, so the model stays differentiable in r and in every weight.

[CLS] is forced to rank 0 here (the variant ALGORITHM.md §3 allows): r_l[0] always scales
[CLS], and the other positions take ranks 1..n-1 by score. This matches the hard extract layer,
which always keeps [CLS] and fills the other k_l - 1 slots by score, so the vectors a learned
configuration keeps are exactly the ranks whose r the search left high.

Like ``powerbert.patch``, attaching replaces only the ``forward`` of the model's encoder and base
model by instance attributes (``encoder.py``) whose layer runner is the ``SoftExtract``;
``SoftExtract.detach`` restores them exactly.
The retention vectors live in the returned ``SoftExtract`` module, not in the model, so the
model's ``state_dict`` and ``save_pretrained`` are unchanged; give ``soft.parameters()`` to the
optimiser (with its own learning rate) and call ``soft.project_()`` after every step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import kernels
from powerbert.encoder import check_model_dtype, install, refuse_installed, uninstall
from powerbert.families import LayerParts, resolve
from powerbert.layer import LayerOutput, attention_output, attention_probs, feed_forward, split_heads


def soft_ranks(scores: torch.Tensor, *, cls_first: bool = True) -> torch.Tensor:
    """Rank of every position by significance.

    Args:
        scores: ``[B, n]`` float significance scores (-inf for padding; NaN ranks as -inf).
        cls_first: force position 0 ([CLS]) to rank 0.

    Returns:
        ``[B, n]`` int64: ``rank[b, j]`` is the place of position j in the order by descending
        score, ties broken by the lower index (a stable sort), [CLS] first when ``cls_first``.
    """
    scores = scores.detach().float()
    # NaN counts as -inf, the rule of every selection path (kernels.select): never ahead of a number.
    scores = torch.where(torch.isnan(scores), float("-inf"), scores)
    if cls_first:
        scores[:, 0] = float("inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # rank -> position
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return ranks.scatter_(1, order, positions)  # position -> rank


def soft_extract_layer(
    parts: LayerParts,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    retention: torch.Tensor,
    *,
    padded: bool,
    cls_first: bool = True,
    return_probs: bool = False,
):
    """One encoder layer with soft extraction after its attention sub-layer.

    Args:
        parts: the layer's modules.
        hidden: ``[B, n, D]`` vectors entering the layer.
        mask: ``[B, n]`` bool, True for real tokens (unchanged by this layer).
        retention: ``[N]`` (N >= n) this layer's retention vector r_l; rank p is scaled by r_l[p].
        padded: False when the batch holds no padding (the mask is then all True).
        cls_first: [CLS] takes rank 0 (see the module docstring).
        return_probs: also return the ``[B, H, n, n]`` attention probabilities.

    Returns:
        ``[B, n, D]`` the layer output (and the probabilities with ``return_probs``).
    """
    n = hidden.shape[1]
    q = split_heads(parts.query, hidden, parts.num_heads)
    k = split_heads(parts.key, hidden, parts.num_heads)
    v = split_heads(parts.value, hidden, parts.num_heads)
    probs = attention_probs(q, k, mask if padded else None)  # explicit: significance needs them
    with torch.no_grad():  # the ranking is not differentiable; r and the vectors are
        scores = kernels.significance(probs.detach(), mask)
    ranks = soft_ranks(scores, cls_first=cls_first)
    context = torch.matmul(parts.probs_dropout(probs), v)
    attended = attention_output(parts, context, hidden)
    scale = retention[:n][ranks]  # [B, n]: r_l[rank of position j]; gradient flows into r
    out = feed_forward(parts, attended * scale.unsqueeze(-1).to(attended.dtype))
    return (out, probs) if return_probs else out


def configuration_from_masses(masses) -> tuple[int, ...]:
    """Read a retention configuration off the layer masses (ALGORITHM.md §3).

    ``k_l = max(1, floor(mass(l)))``, then forced non-increasing: ``k_l = min(k_l, k_{l-1})``.
    """
    config: list[int] = []
    for mass in masses:
        k = max(1, int(math.floor(float(mass) + 1e-6)))  # 1e-6: 3.0 stored as 2.9999998 is 3
        config.append(min(k, config[-1]) if config else k)
    return tuple(config)


class SoftExtract(nn.Module):
    """The retention vectors of an attached soft extract, and the handle to detach it.

    Attributes:
        retention: ``nn.Parameter [L, N]`` float32, r_l = ``retention[l - 1]``, initialised to 1.
        max_length: N.
        cls_first: [CLS] takes rank 0.
    """

    def __init__(self, num_layers: int, max_length: int, *, cls_first: bool = True):
        super().__init__()
        self.retention = nn.Parameter(torch.ones(num_layers, max_length))
        self.max_length = max_length
        self.cls_first = cls_first
        # object.__setattr__: the model must not become a registered submodule of this one
        # (soft.parameters() is the retention vectors only).
        object.__setattr__(self, "_model", None)

    # The layer runner interface of ``encoder.EncoderForward``. Training keeps the input's
    # shape (the retention vectors are indexed by rank up to N): reorder, never trim.
    static_shapes = True
    installed_message = "model already has a soft extract attached; call soft.detach() first"

    def check(self, count: int) -> None:
        if count != self.retention.shape[0]:
            raise RuntimeError(f"the model now has {count} encoder layers, the soft extract {self.retention.shape[0]}")

    def plan(self, mask: torch.Tensor, *, static: bool) -> None:
        return None  # nothing is removed: every layer keeps the input's shape

    def layer(self, index: int, count: int, parts: LayerParts, hidden: torch.Tensor, mask: torch.Tensor, *,
              padded: bool, need_probs: bool, cls_only_last: bool, plan=None) -> LayerOutput:
        if hidden.shape[1] > self.max_length:
            raise ValueError(f"input length {hidden.shape[1]} exceeds the soft extract's max_length {self.max_length}")
        hidden, probs = soft_extract_layer(parts, hidden, mask, self.retention[index], padded=padded,
                                           cls_first=self.cls_first, return_probs=True)
        return LayerOutput(hidden, mask, None, probs if need_probs else None)

    @torch.no_grad()
    def project_(self) -> None:
        """Project r onto [0, 1] in place (call after every optimiser step)."""
        self.retention.clamp_(0.0, 1.0)

    def masses(self) -> torch.Tensor:
        """``[L]`` mass(l) = sum_p r_l[p] (differentiable)."""
        return self.retention.sum(dim=1)

    def regularizer(self, lam: float) -> torch.Tensor:
        """``lam * sum_l l * mass(l)`` with l = 1..L (deeper layers pay more); a scalar tensor."""
        depth = torch.arange(1, self.retention.shape[0] + 1, dtype=self.retention.dtype,
                             device=self.retention.device)
        return lam * (depth * self.masses()).sum()

    def configuration(self) -> tuple[int, ...]:
        """The retention configuration (k_1, ..., k_L) the current r implies (§3 read-out)."""
        return configuration_from_masses(self.masses().detach().cpu().tolist())

    @property
    def attached(self) -> bool:
        return self._model is not None

    def detach(self) -> nn.Module:
        """Restore the model's encoder and base forwards exactly; returns the model."""
        if self._model is None:
            raise RuntimeError("soft extract is not attached to a model")
        model = self._model
        uninstall(model)
        object.__setattr__(self, "_model", None)
        return model


def attach_soft_extract(model: nn.Module, max_length: int, *, cls_first: bool = True) -> SoftExtract:
    """Insert soft extract layers into ``model`` (in place) and return their retention vectors.

    Args:
        model: a supported Hugging Face model (``powerbert.supported_models()``), not patched.
        max_length: N, the padded input length; inputs longer than N are rejected at run time.
        cls_first: force [CLS] to rank 0 (default, see the module docstring).

    Returns:
        A ``SoftExtract`` on the model's device; ``soft.detach()`` undoes the attachment.

    Raises:
        TypeError: unsupported model. ValueError: ``max_length < 1``.
        RuntimeError: the model is patched or already has a soft extract attached.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    family, base, _ = resolve(model)
    refuse_installed(model)
    check_model_dtype(model)
    layers = family.layers(family.encoder(base))
    device = next(model.parameters()).device
    soft = SoftExtract(len(layers), max_length, cls_first=cls_first).to(device)
    install(model, family, base, soft)
    object.__setattr__(soft, "_model", model)
    return soft
