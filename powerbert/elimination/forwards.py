"""The forwards powerbert installs in a model: one for its encoder, one for its base model.

Both are instance attributes (``module.forward``) holding small picklable objects, never
closures: a patched model deep-copies, pickles (``torch.save(model)``) and compiles like any
other. They hold the module they belong to and nothing below it: the layers are looked up
from the encoder at every call (``Family.layers``), so modules replaced after patching
(``torch.ao.quantization.quantize_dynamic``, adapters, a swapped ``Linear``) are the ones that
run, and a deep copy runs its own weights.

* ``EncoderForward`` runs a *layer runner* over the family's layers: ``patch`` passes the hard
  extract, ``attach_soft_extract`` the soft one. It honours ``gradient_checkpointing_enable()``
  (each layer is checkpointed like the stock layer module would be).
* ``BaseForward`` wraps the base model's own forward so that its output carries what the stock
  output capture (forward hooks on the stock layer modules, which no longer run) cannot give:
  ``hidden_states`` (L + 1 entries: the vectors entering the first layer, then each layer's
  survivors), ``attentions`` (each layer's probabilities over the vectors alive in it), and
  ``kept_mask`` / ``kept_positions`` for the survivors of the last layer; asked with
  ``powerbert_last_vectors=True`` (``LAST_VECTORS_KWARG``), also ``last_vectors`` ``[B, n, D]``:
  every input position's last vector (a survivor's last-layer output; an eliminated token's
  vector as it entered the layer that dropped it), in input order, zeros at padding.
* ``HeadForward`` (only on heads that read [CLS] alone, e.g. sequence classification) tells the
  encoder, through the base model's keyword arguments, that this call may run its last layer
  for [CLS] only. Calling the base model inside such a head directly still returns every
  survivor.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from powerbert.elimination import dispatch, packed_graphs
from powerbert.elimination.families import Family, family_named, resolve
from powerbert.elimination.layout import real_tokens_first, static_shapes_now
from powerbert.elimination.packed import packed_encoder, packed_layers_of
from powerbert.elimination.packed_plan import bucket_capacities, host_mask, plan_packed_cached

# The keyword through which BaseForward hands the encoder a record to fill (every supported
# base model passes its **kwargs on to the encoder).
RECORD_KWARG = "powerbert_record"
# The keyword through which HeadForward tells BaseForward that only [CLS] is read.
CLS_ONLY_KWARG = "powerbert_cls_only"
# The keyword that asks BaseForward for ``last_vectors`` (see the module docstring).
LAST_VECTORS_KWARG = "powerbert_last_vectors"


def write_rows(full: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``full`` ``[B, n + 1, D]`` with each real slot's vector written at its input position.

    hidden ``[B, k, D]``, positions ``[B, k]`` int64 (input positions), mask ``[B, k]`` bool (the
    slot holds a real token). Padding slots write to the spare column ``n`` (no two real slots
    of a row share a position, so nothing real is written twice); no host read.
    """
    spare = full.shape[1] - 1
    where = torch.where(mask, positions, torch.full_like(positions, spare))
    return full.scatter(1, where[..., None].expand(-1, -1, hidden.shape[-1]), hidden.to(full.dtype))


def key_mask(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Recover the ``[B, n]`` key padding mask from the mask transformers hands the encoder.

    Args:
        attention_mask: None (no padding), ``[B, n]`` 0/1, or ``[B, 1, n|1, n]`` as built by
            ``create_bidirectional_mask``: bool (True = attend, sdpa) or float (0 = attend,
            dtype min = masked, eager).
        hidden: ``[B, n, D]`` embeddings (for shape and device).

    Returns:
        ``(mask [B, n] bool, padded)``; ``padded`` is False only when no mask was given.
    """
    batch, length = hidden.shape[:2]
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=hidden.device), False
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"powerbert needs a tensor attention mask, got {type(attention_mask).__name__}; "
            f"load the model with attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.dim() == 4:
        # Every query row of a bidirectional mask is the same key mask; row 0 is [CLS].
        row = attention_mask[:, 0, 0, :]
        mask = row if row.dtype == torch.bool else row == 0
    elif attention_mask.dim() == 2:
        mask = attention_mask != 0
    else:
        raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} is neither [B, n] nor [B, 1, n, n]")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"attention mask covers shape {tuple(mask.shape)}, the input is {(batch, length)}")
    return mask, True


def _run_layer(module: nn.Module | None, step, hidden: torch.Tensor, mask: torch.Tensor):
    """``step(hidden, mask)``, under activation checkpointing where the stock layer would be.

    transformers' ``GradientCheckpointingLayer`` checkpoints when its ``gradient_checkpointing``
    flag is set and it is training; ``gradient_checkpointing_enable`` stores the function to use
    (``use_reentrant`` and the rest of the user's kwargs) as ``_gradient_checkpointing_func``.
    """
    if (module is not None and getattr(module, "gradient_checkpointing", False) and module.training
            and torch.is_grad_enabled()):
        func = getattr(module, "_gradient_checkpointing_func", None) or functools.partial(
            checkpoint, use_reentrant=False)
        return func(step, hidden, mask)
    return step(hidden, mask)


class EncoderForward:
    """``encoder.forward`` while powerbert is installed: ``runner.layer`` over every layer.

    Attributes:
        encoder: the module whose forward this replaces.
        family: ``Family.name`` (a name, so that the object pickles).
        runner: the layer runner: ``runner.plan(mask, *, static)`` (per-batch keep counts, or
            None), ``runner.layer(index, count, parts, hidden, mask, *, padded, need_probs,
            cls_only_last, plan, bias) -> layer.LayerOutput`` (``bias``: the family's position
            bias for this layer, or None), and ``runner.check(count)``.
        saved_forward: ``(had_one, value)``: the encoder's own instance ``forward`` before, if any.
        head: class name of the head that got a ``HeadForward``, or None.
    """

    def __init__(self, encoder: nn.Module, family: str, runner, saved_forward: tuple[bool, Any],
                 head: str | None = None):
        self.encoder = encoder
        self.family = family
        self.runner = runner
        self.saved_forward = saved_forward
        self.head = head

    def __call__(self, hidden_states, attention_mask=None, *args, **kwargs):
        record = kwargs.pop(RECORD_KWARG, None)
        family: Family = family_named(self.family)
        plan = record.get("packed_plan") if record is not None else None
        if plan is not None:
            # BaseForward planned a packed forward and handed transformers no mask.
            hidden = family.enter(self.encoder, hidden_states) if family.enter is not None else hidden_states
            layers = record["packed_layers"]
            self.runner.check(len(layers))
            out = None
            if plan.bucket is not None:
                settings = record["packed_settings"]
                out = packed_graphs.pool_for(self.encoder).run(
                    layers, hidden, plan, bucket_capacities(plan.bucket, *settings), settings)
            if out is None:
                out = packed_encoder(layers, hidden, plan)
            hidden, record["kept_mask"], record["kept_positions"] = out
            return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden)
        mask, padded = key_mask(attention_mask, hidden_states)
        hidden = family.enter(self.encoder, hidden_states) if family.enter is not None else hidden_states
        layers = family.layers(self.encoder)
        self.runner.check(len(layers))
        hidden_states_out = record.get("hidden_states") if record is not None else None
        attentions_out = record.get("attentions") if record is not None else None
        need_probs = attentions_out is not None
        # Only a head that reads [CLS] alone lets the last layer shrink to [CLS]; asked for every
        # layer's vectors or probabilities, it runs in full.
        cls_only_last = (record is not None and record.get("cls_only", False)
                         and hidden_states_out is None and not need_probs)
        # MPNet adds a relative-position bias to every layer's logits: computed per layer from the
        # survivors' original positions, so positions are followed even when nobody reads them.
        position_bias = family.position_bias
        follow_positions = record is not None or position_bias is not None
        static = static_shapes_now(getattr(self.runner, "static_shapes", None))
        if padded:
            # Real tokens first (any padding side), all-padding columns dropped unless static.
            hidden, mask, positions, padded = real_tokens_first(hidden, mask, trim=not static)
        else:
            positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        plan = self.runner.plan(mask, static=static)
        keeps_everything = getattr(self.runner, "keeps_everything", None)
        if (cls_only_last and keeps_everything is not None and not torch.compiler.is_exporting()
                and keeps_everything(hidden.shape[1])):
            # Nothing is eliminated for this batch: run the stock computation, last layer in full,
            # so keep-all equals stock to the bit ([CLS] alone would sum in another order).
            cls_only_last = False
        if hidden_states_out is not None:
            hidden_states_out.append(hidden)
        want_last = record is not None and record.get("last_vectors") is not None
        if want_last:
            width = attention_mask.shape[-1] if attention_mask is not None else hidden_states.shape[1]
            last = hidden.new_zeros(hidden.shape[0], width + 1, hidden.shape[-1])
        for index, parts in enumerate(layers):
            if want_last:  # what enters this layer is the last vector of whatever it drops
                last = write_rows(last, hidden, positions, mask)
            bias = None if position_bias is None else position_bias(self.encoder, positions)
            step = functools.partial(self.runner.layer, index, len(layers), parts, padded=padded,
                                     need_probs=need_probs, cls_only_last=cls_only_last, plan=plan, bias=bias)
            out = _run_layer(parts.module, step, hidden, mask)
            hidden, mask, indices, probs = out
            if plan is not None and isinstance(plan[index], tuple):
                padded = True  # rows kept different counts: the unused slots are padding
            if indices is not None and follow_positions:
                positions = torch.gather(positions, 1, indices)
            if hidden_states_out is not None:
                hidden_states_out.append(hidden)
            if need_probs:
                attentions_out.append(probs)
        if record is not None:
            record["kept_mask"] = mask
            record["kept_positions"] = positions
            if want_last:
                record["last_vectors"] = write_rows(last, hidden, positions, mask)[:, :-1]
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden)


class BaseForward:
    """``base_model.forward`` while powerbert is installed: the stock forward, then the outputs
    the stock capture cannot see (see the module docstring).

    Attributes:
        base: the base model (``BertModel``, ...).
        saved_forward: ``(had_one, value)``: the base model's own instance ``forward`` before, if any.
        family: ``Family.name``; its ``base_forward``, if any, runs instead of the class's forward.
    """

    def __init__(self, base: nn.Module, saved_forward: tuple[bool, Any], family: str | None = None):
        self.base = base
        self.saved_forward = saved_forward
        self.family = family

    def _flag(self, kwargs: dict, name: str) -> bool:
        value = kwargs.pop(name, None)
        if value is None:
            value = getattr(self.base.config, name, False)
        if isinstance(value, (list, tuple, set)):
            raise ValueError(f"{name} as a list of layers is not supported by a powerbert-patched model; pass True")
        return bool(value)

    def __call__(self, *args, **kwargs):
        want_hidden = self._flag(kwargs, "output_hidden_states")
        want_attentions = self._flag(kwargs, "output_attentions")
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.base.config, "return_dict", True)
        record = {
            "cls_only": bool(kwargs.pop(CLS_ONLY_KWARG, False)),
            "hidden_states": [] if want_hidden else None,
            "attentions": [] if want_attentions else None,
            "kept_mask": None,
            "kept_positions": None,
            "last_vectors": True if kwargs.pop(LAST_VECTORS_KWARG, False) else None,
        }
        args, kwargs = self._plan_packed(record, args, kwargs)
        had_own, own = self.saved_forward
        # The class's function with the module as first argument, not bound with __get__: Dynamo
        # (torch 2.11) cannot trace function.__get__ and breaks the graph there.
        # (Objects pickled before ``family`` existed have none: their families all use the stock forward.)
        family = family_named(self.family) if getattr(self, "family", None) else None
        stock = type(self.base).forward if family is None or family.base_forward is None else family.base_forward
        forward = own if had_own else functools.partial(stock, self.base)
        # The stock capture is switched off: its hooks sit on layer modules that no longer run.
        out = forward(*args, return_dict=True, output_hidden_states=False, output_attentions=False,
                      **{RECORD_KWARG: record}, **kwargs)
        if want_hidden:
            out["hidden_states"] = tuple(record["hidden_states"])
        if want_attentions:
            out["attentions"] = tuple(record["attentions"])
        if record["kept_mask"] is not None:
            out["kept_mask"] = record["kept_mask"]
            out["kept_positions"] = record["kept_positions"]
        if isinstance(record["last_vectors"], torch.Tensor):
            out["last_vectors"] = record["last_vectors"]
        return out if return_dict else out.to_tuple()

    def _plan_packed(self, record: dict, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Plan a packed forward (``elimination/packed.py``) into ``record`` when this call can take
        one, and take the attention mask away from the stock forward (transformers would expand
        it and check it with ``.all()``, a host synchronisation); ``(args, kwargs)`` unchanged
        otherwise.

        The packed forward serves inference (no autograd, eval mode, not traced, exported or
        captured) of a hard-extract runner that selects by attention, on CUDA in fp16/bf16 (or
        forced, ``dispatch.use_packed``), when nothing asks for per-layer outputs, for families
        without a position bias whose layers are plain Linear/LayerNorm modules.
        The lengths come from the attention mask: one device-to-host read when it is on the
        GPU, none when it is given on the CPU (the tokenizer's) or not at all.
        """
        if (record["hidden_states"] is not None or record["attentions"] is not None
                or record["last_vectors"] is not None or self.base.training
                or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return args, kwargs
        forward = installed(self.base)
        settings = getattr(forward.runner, "packed_settings", lambda: None)() if forward is not None else None
        family = family_named(self.family) if getattr(self, "family", None) else None
        if settings is None or family is None or family.position_bias is not None:
            return args, kwargs
        parameter = next(self.base.parameters(), None)
        if parameter is None or not dispatch.packed_wanted(parameter.device, parameter.dtype):
            return args, kwargs
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.base.parameters()):
            return args, kwargs
        if parameter.is_cuda and torch.cuda.is_current_stream_capturing():
            return args, kwargs  # a plan copied from host memory cannot be replayed
        names = _forward_parameters(type(self.base))
        bound = dict(zip(names, args))
        if set(bound) & set(kwargs):
            return args, kwargs  # let the stock forward report the duplicate argument
        bound.update(kwargs)
        shaped = bound.get("input_ids") if bound.get("input_ids") is not None else bound.get("inputs_embeds")
        if shaped is None or shaped.dim() < 2 or bound.get("past_key_values") is not None:
            return args, kwargs
        layers = packed_layers_of(family, family.encoder(self.base), parameter.dtype, parameter.device)
        if layers is None:
            return args, kwargs
        batch, width = shaped.shape[:2]
        retention, minimum, cuda_graphs = settings
        mask = host_mask(bound.get("attention_mask"), batch, width)
        if not mask.any():
            return args, kwargs  # no real token at all: the padded forward's one masked slot a row
        bound.pop("attention_mask", None)
        cls_only = bool(record["cls_only"] and forward.runner.cls_only_last_layer)
        bucket = None
        if cuda_graphs and packed_graphs.graphs_serve(parameter.device):
            lengths = mask.sum(axis=1)
            bucket = packed_graphs.bucket_for(batch, int(lengths.sum()), int(lengths.max()) if batch else 0)
        record["packed_plan"] = plan_packed_cached(mask, retention, minimum=minimum, device=parameter.device,
                                                   cls_only_last=cls_only, bucket=bucket)
        record["packed_settings"] = (retention, minimum, cls_only)
        record["packed_layers"] = layers
        bound["attention_mask"] = None
        return (), bound


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> tuple[str, ...]:
    """Names of ``cls.forward``'s positional parameters after ``self`` (binding positional calls)."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


class HeadForward:
    """``head.forward`` while patched, for heads that read only [CLS] of the last layer: the
    head's own forward, telling the base model (every supported head passes its ``**kwargs`` on
    to it) that this call reads [CLS] alone.

    Attributes:
        head: the head model. saved_forward: ``(had_one, value)`` as in ``EncoderForward``.
    """

    def __init__(self, head: nn.Module, saved_forward: tuple[bool, Any]):
        self.head = head
        self.saved_forward = saved_forward

    def __call__(self, *args, **kwargs):
        had_own, own = self.saved_forward
        forward = own if had_own else functools.partial(type(self.head).forward, self.head)  # see BaseForward
        return forward(*args, **{CLS_ONLY_KWARG: True}, **kwargs)


def installed(model: nn.Module) -> EncoderForward | None:
    """The ``EncoderForward`` powerbert installed in ``model``'s encoder, or None.

    ``model`` may be a head or its base model; unsupported models have none.
    """
    try:
        family, base, _ = resolve(model)
    except TypeError:
        return None
    forward = family.encoder(base).__dict__.get("forward")
    return forward if isinstance(forward, EncoderForward) else None


# Model dtypes elimination runs in (fp64 takes the torch path; the Triton kernels the others).
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_model_dtype(model: nn.Module) -> None:
    """Refuse, before anything is installed, a model whose float parameters elimination cannot run."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype not in MODEL_DTYPES:
            raise TypeError(
                f"powerbert runs float16, bfloat16, float32 and float64 models; parameter {name} is {param.dtype}"
            )


def refuse_installed(model: nn.Module) -> None:
    """Raise RuntimeError (the runner's ``installed_message``) if powerbert is installed in ``model``
    or in the model that holds it: patches never stack."""
    forward = installed(model)
    if forward is not None:
        raise RuntimeError(forward.runner.installed_message)


def install(model: nn.Module, family: Family, base: nn.Module, runner, *, cls_only_head: bool = False
            ) -> EncoderForward:
    """Install ``EncoderForward(runner)`` and ``BaseForward`` in ``model`` (resolved to ``family``,
    ``base``), and ``HeadForward`` on ``model`` when ``cls_only_head``. The caller has checked that
    nothing is installed yet."""
    encoder = family.encoder(base)
    head = model if cls_only_head and family.heads_pass_kwargs and model is not base else None
    forward = EncoderForward(encoder, family.name, runner, saved_attribute(encoder, "forward"),
                             head=type(head).__name__ if head is not None else None)
    base_forward = BaseForward(base, saved_attribute(base, "forward"), family.name)
    if head is not None:
        head.forward = HeadForward(head, saved_attribute(head, "forward"))
    encoder.forward = forward
    base.forward = base_forward
    return forward


def uninstall(model: nn.Module) -> EncoderForward:
    """Restore the forwards ``install`` replaced exactly; returns the ``EncoderForward``.

    Raises:
        RuntimeError: nothing is installed, or ``model`` is the base model of a head that was
            patched (unpatch the head: it holds a forward too).
    """
    forward = installed(model)
    if forward is None:
        raise RuntimeError("powerbert is not installed in this model")
    _, base, _ = resolve(model)
    head_forward = model.__dict__.get("forward")
    if forward.head is not None and not isinstance(head_forward, HeadForward):
        raise RuntimeError(
            f"this {type(model).__name__} was patched through the {forward.head} that holds it; "
            f"call unpatch on that model"
        )
    restore_attribute(forward.encoder, "forward", forward.saved_forward)
    base_forward = base.__dict__.get("forward")
    if isinstance(base_forward, BaseForward):
        restore_attribute(base, "forward", base_forward.saved_forward)
    if isinstance(head_forward, HeadForward):
        restore_attribute(model, "forward", head_forward.saved_forward)
    return forward


def saved_attribute(obj: Any, name: str) -> tuple[bool, Any]:
    """``(had_one, value)``: whether ``obj`` holds ``name`` itself (an instance attribute, not one
    it inherits) and its value. Plain values, so what ``restore_attribute`` needs pickles and copies."""
    return (name in obj.__dict__, obj.__dict__.get(name))


def restore_attribute(obj: Any, name: str, saved: tuple[bool, Any]) -> None:
    """Put ``obj.name`` back as ``saved_attribute`` found it: the old value, or no instance attribute."""
    had_one, value = saved
    if had_one:
        setattr(obj, name, value)
    elif name in obj.__dict__:
        delattr(obj, name)
