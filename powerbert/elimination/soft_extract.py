"""Soft extract (powerbert/ALGORITHM.md §3): learn the retention configuration with retention vectors.

Every encoder layer l gets a learnable retention vector r_l in [0, 1]^N (N = the padded input
length). After the layer's attention sub-layer (output dense, residual, LayerNorm) and before
its feed-forward sub-layer, the n positions are ranked by this layer's significance scores
(powerbert/ALGORITHM.md §1, from the layer's own attention probabilities before dropout; descending, ties
by the lower index) and the word vector of rank p is multiplied by r_l[p]. Nothing is removed
and the mask is unchanged, so the model stays differentiable in r and in every weight.

[CLS] is forced to rank 0 here (the variant powerbert/ALGORITHM.md §3 allows): r_l[0] always scales
[CLS], and the other positions take ranks 1..n-1 by score. This matches the hard extract layer,
which always keeps [CLS] and fills the other k_l - 1 slots by score, so the vectors a learned
configuration keeps are exactly the ranks whose r the search left high.

Like ``powerbert.patch``, attaching replaces only the ``forward`` of the model's encoder and base
model by instance attributes (``encoder.py``) whose layer runner is the ``SoftExtract``;
``SoftExtract.detach`` restores them exactly.
The retention vectors live in the returned ``SoftExtract`` module, not in the model, so the
model's ``state_dict`` and ``save_pretrained`` are unchanged; give ``soft.parameters()`` to the
optimiser (with its own learning rate) and call ``soft.project_()`` after every step.

Two modes, the two kinds of retention configuration (``retention.py``):

* ``"fixed"`` (powerbert/ALGORITHM.md §3, the paper): r_l[p] scales the vector of absolute rank p; the
  regulariser is ``lambda * sum_l l * mass(l)`` with mass(l) = sum_p r_l[p] (soft slots kept);
  the read-out is ints ``k_l = max(1, floor(mass(l)))``.
* ``"proportional"`` (powerbert/ALGORITHM.md §8): r_l is a step function over *relative* rank x in [0, 1),
  in G = N bins (bin g covers [g / G, (g + 1) / G)). The vector of rank p in a sequence of len real
  tokens covers [p / len, (p + 1) / len) and is scaled by the *average* of r_l over that interval
  (``relative_scale``). So every bin hears every sequence, in proportion to its overlap (sampling
  r_l at bin(p / len) instead would leave, for a sequence shorter than G, the bins between its
  ranks to the regulariser alone, and the read-out would count those holes as dropped vectors),
  and a sequence's soft-kept vectors sum to exactly ``len * share(l)``, share(l) = mean_g r_l[g].
  With G = N a sequence of N tokens is scaled exactly as in fixed mode (r_l[p] at rank p).
  Regulariser: ``lambda * sum_l l * share(l) * mean_len``, mean_len = the batch's mean real
  length: the vectors the batch's sequences soft-keep on average, so the same lambda weighs a
  token's task gradient against lambda * l as in fixed mode (without lengths: len = N, i.e.
  ``sum_g r_l[g]``, the fixed-mode formula). Read-out: floats
  ``f_l = min(1, max(1 / G, share(l)))``, forced non-increasing, rounded to 4 decimals
  (``fractions_from_shares``); the hard extract then keeps ``ceil(f_l * len_i)`` of sequence i.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from powerbert.elimination import dispatch
from powerbert.elimination.forwards import check_model_dtype, install, refuse_installed, uninstall
from powerbert.elimination.families import LayerParts, resolve
from powerbert.elimination.layer import LayerOutput, attention_output, attention_probs, feed_forward, split_heads

# The two kinds of configuration a soft extract learns (see the module docstring).
MODES = ("fixed", "proportional")


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


def relative_scale(retention: torch.Tensor, ranks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scale of every position under proportional soft extract (see the module docstring).

    The vector of rank p in a sequence of len real tokens is scaled by the average of the step
    function r over [p / len, (p + 1) / len): ``len * (I((p + 1) / len) - I(p / len))`` with
    I(x) the integral of r over [0, x), piecewise linear between the bin edges. The bin of an
    edge is found in integers (``p * G // len``), the integral is taken in float64 (so r = 1
    gives a scale of 1 to float32 precision), and the result is differentiable in r.

    Args:
        retention: ``[G]`` float, r_l over G bins of relative rank.
        ranks: ``[B, n]`` int64 from ``soft_ranks`` (real tokens take ranks 0..len-1).
        mask: ``[B, n]`` bool, True for real tokens; len = its row sums.

    Returns:
        ``[B, n]`` float64; padding positions get 1 (masked as keys, they never reach a real
        token, and they pass no gradient to r).
    """
    bins = retention.shape[0]
    r = retention.to(torch.float64)
    integral = torch.cat([r.new_zeros(1), torch.cumsum(r, 0)]) / bins  # I at the bin edges g / G
    length = mask.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
    rank = torch.minimum(ranks, length - 1)  # padding ranks clamped; their scale is replaced by 1

    def integral_to(edge: torch.Tensor) -> torch.Tensor:  # I(edge / len), edge in 0..len
        numerator = edge * bins
        index = torch.clamp(numerator // length, max=bins - 1)
        within = (numerator - index * length).to(torch.float64) / length  # in [0, 1]
        return integral[index] + within * r[index] / bins

    scale = (integral_to(rank + 1) - integral_to(rank)) * length
    return torch.where(mask, scale, torch.ones_like(scale))


def soft_extract_layer(
    parts: LayerParts,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    retention: torch.Tensor,
    *,
    padded: bool,
    cls_first: bool = True,
    relative: bool = False,
    return_probs: bool = False,
    bias: torch.Tensor | None = None,
):
    """One encoder layer with soft extraction after its attention sub-layer.

    Args:
        parts: the layer's modules.
        hidden: ``[B, n, D]`` vectors entering the layer.
        mask: ``[B, n]`` bool, True for real tokens (unchanged by this layer).
        retention: this layer's retention vector r_l. Fixed (``relative=False``): ``[N]``
            (N >= n), rank p is scaled by r_l[p]. Proportional (``relative=True``): ``[G]`` bins
            of relative rank, rank p of a sequence of len real tokens is scaled by the average of
            r_l over [p / len, (p + 1) / len) (``relative_scale``).
        padded: False when the batch holds no padding (the mask is then all True).
        cls_first: [CLS] takes rank 0 (see the module docstring).
        relative: proportional mode (see ``retention``).
        return_probs: also return the ``[B, H, n, n]`` attention probabilities.
        bias: ``[B | 1, H, n, n]`` added to the scaled attention logits (``Family.position_bias``),
            or None.

    Returns:
        ``[B, n, D]`` the layer output (and the probabilities with ``return_probs``).
    """
    n = hidden.shape[1]
    q = split_heads(parts.query, hidden, parts.num_heads)
    k = split_heads(parts.key, hidden, parts.num_heads)
    v = split_heads(parts.value, hidden, parts.num_heads)
    probs = attention_probs(q, k, mask if padded else None, bias=bias)  # explicit: significance needs them
    scores = dispatch.significance(probs, mask)  # detached: the ranking is not differentiable; r and the vectors are
    ranks = soft_ranks(scores, cls_first=cls_first)
    context = torch.matmul(parts.probs_dropout(probs), v)
    attended = attention_output(parts, context, hidden)
    if relative:
        scale = relative_scale(retention, ranks, mask)  # [B, n]; gradient flows into r
    else:
        scale = retention[:n][ranks]  # [B, n]: r_l[rank of position j]; gradient flows into r
    out = feed_forward(parts, attended * scale.unsqueeze(-1).to(attended.dtype))
    return (out, probs) if return_probs else out


def configuration_from_masses(masses) -> tuple[int, ...]:
    """Read a retention configuration off the layer masses (powerbert/ALGORITHM.md §3).

    ``k_l = max(1, floor(mass(l)))``, then forced non-increasing: ``k_l = min(k_l, k_{l-1})``.
    """
    config: list[int] = []
    for mass in masses:
        k = max(1, int(math.floor(float(mass) + 1e-6)))  # 1e-6: 3.0 stored as 2.9999998 is 3
        config.append(min(k, config[-1]) if config else k)
    return tuple(config)


def fractions_from_shares(shares, bins: int) -> tuple[float, ...]:
    """Read a proportional configuration off the layer shares (see the module docstring).

    ``f_l = min(1, max(1 / bins, share(l)))`` (one bin is the least the read-out resolves; the
    hard extract keeps at least one vector anyway), then forced non-increasing
    (``f_l = min(f_l, f_{l-1})``), then rounded to 4 decimals (at least 1e-4, so f_l > 0).
    Rounding is monotone, so the result stays non-increasing; 1.0 stays the float 1.0.
    """
    fractions: list[float] = []
    for share in shares:
        f = min(1.0, max(1.0 / bins, float(share)))
        fractions.append(min(f, fractions[-1]) if fractions else f)
    return tuple(max(1e-4, round(f, 4)) for f in fractions)


class SoftExtract(nn.Module):
    """The retention vectors of an attached soft extract, and the handle to detach it.

    Attributes:
        retention: ``nn.Parameter [L, N]`` float32, r_l = ``retention[l - 1]``, initialised to 1:
            over absolute rank (fixed mode) or over N bins of relative rank (proportional).
        max_length: N.
        cls_first: [CLS] takes rank 0.
        mode: ``"fixed"`` or ``"proportional"`` (see the module docstring).
    """

    def __init__(self, num_layers: int, max_length: int, *, cls_first: bool = True, mode: str = "fixed"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.retention = nn.Parameter(torch.ones(num_layers, max_length))
        self.max_length = max_length
        self.cls_first = cls_first
        self.mode = mode
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
              padded: bool, need_probs: bool, cls_only_last: bool, plan=None, bias=None) -> LayerOutput:
        if hidden.shape[1] > self.max_length:
            raise ValueError(f"input length {hidden.shape[1]} exceeds the soft extract's max_length {self.max_length}")
        hidden, probs = soft_extract_layer(parts, hidden, mask, self.retention[index], padded=padded,
                                           cls_first=self.cls_first, relative=self.mode == "proportional",
                                           return_probs=True, bias=bias)
        return LayerOutput(hidden, mask, None, probs if need_probs else None)

    @torch.no_grad()
    def project_(self) -> None:
        """Project r onto [0, 1] in place (call after every optimiser step)."""
        self.retention.clamp_(0.0, 1.0)

    def masses(self, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``[L]`` mass(l), the soft count of vectors kept after layer l (differentiable).

        Fixed: sum_p r_l[p] (``lengths`` is ignored). Proportional: share(l) * mean_len, the
        vectors a sequence of the mean real length of ``lengths`` (``[B]``, the batch) soft-keeps;
        ``lengths`` None takes len = N, which is sum_g r_l[g] (G = N), the fixed-mode formula.
        """
        if self.mode == "fixed" or lengths is None:
            return self.retention.sum(dim=1)
        mean_length = lengths.to(device=self.retention.device, dtype=self.retention.dtype).mean()
        return self.shares() * mean_length

    def shares(self) -> torch.Tensor:
        """``[L]`` share(l) = mean_g r_l[g]: in proportional mode, the share of every sequence's
        vectors that layer l soft-keeps (differentiable)."""
        return self.retention.mean(dim=1)

    def regularizer(self, lam: float, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``lam * sum_l l * mass(l)`` with l = 1..L (deeper layers pay more); a scalar tensor.

        ``lengths``: ``[B]`` real lengths of the batch (``attention_mask.sum(1)``); used in
        proportional mode only (see ``masses``).
        """
        depth = torch.arange(1, self.retention.shape[0] + 1, dtype=self.retention.dtype,
                             device=self.retention.device)
        return lam * (depth * self.masses(lengths)).sum()

    def configuration(self) -> tuple:
        """The retention configuration the current r implies: ints (k_1, ..., k_L) in fixed mode
        (§3 read-out), floats (f_1, ..., f_L) in proportional mode (``fractions_from_shares``)."""
        if self.mode == "proportional":
            return fractions_from_shares(self.shares().detach().cpu().tolist(), self.retention.shape[1])
        return configuration_from_masses(self.masses().detach().cpu().tolist())

    @property
    def attached(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> nn.Module | None:
        """The model this soft extract is attached to, or None once detached (read-only: the
        attachment is made by ``attach_soft_extract`` and undone by ``detach``)."""
        return self._model

    def detach(self) -> nn.Module:
        """Restore the model's encoder and base forwards exactly; returns the model."""
        if self._model is None:
            raise RuntimeError("soft extract is not attached to a model")
        model = self._model
        uninstall(model)
        object.__setattr__(self, "_model", None)
        return model


def attach_soft_extract(model: nn.Module, max_length: int, *, cls_first: bool = True,
                        mode: str = "fixed") -> SoftExtract:
    """Insert soft extract layers into ``model`` (in place) and return their retention vectors.

    Args:
        model: a supported Hugging Face model (``powerbert.supported_models()``), not patched.
        max_length: N, the padded input length; inputs longer than N are rejected at run time.
            In proportional mode also G, the number of relative-rank bins.
        cls_first: force [CLS] to rank 0 (default, see the module docstring).
        mode: ``"fixed"`` (learn slot counts, ints) or ``"proportional"`` (learn shares of each
            sequence's length, floats); see the module docstring.

    Returns:
        A ``SoftExtract`` on the model's device; ``soft.detach()`` undoes the attachment.

    Raises:
        TypeError: unsupported model. ValueError: ``max_length < 1`` or an unknown ``mode``.
        RuntimeError: the model is patched or already has a soft extract attached.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
    family, base, _ = resolve(model)
    refuse_installed(model)
    check_model_dtype(model)
    layers = family.layers(family.encoder(base))
    device = next(model.parameters()).device
    soft = SoftExtract(len(layers), max_length, cls_first=cls_first, mode=mode).to(device)
    install(model, family, base, soft)
    object.__setattr__(soft, "_model", model)
    return soft
