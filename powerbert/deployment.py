"""Deploy a patched model outside eager PyTorch: ``torch.export`` and ONNX (ONNX Runtime), int8.

    from powerbert.deployment import export_onnx, export_program
    export_onnx("work/mr_run", "model.onnx")                    # a model folder -> ONNX, ORT-optimised
    export_onnx("work/mr_run", "model.int8.onnx", quantize="int8")
    program = export_program(patched_model, example_inputs)     # torch.export.ExportedProgram

What is exported is a plain forward of the model's inputs (``input_ids``, ``attention_mask``
and ``token_type_ids`` where the model takes them), each ``[batch, length]`` int64 with both
dimensions dynamic, returning (``OUTPUTS``):

* a sequence classifier: ``logits`` ``[batch, classes]``;
* a bare encoder: ``last_hidden_state`` ``[batch, k_L, D]``, ``kept_mask`` ``[batch, k_L]``
  (bool) and ``kept_positions`` ``[batch, k_L]`` int64, as the patched model returns them;
* a sentence-transformers model: ``sentence_embedding`` ``[batch, D]`` (its pooling and
  normalisation included).

While ``torch.export`` traces, the patched forward takes its static layout with symbolic shapes
and no host read: each layer of a fixed configuration keeps ``min(k_l, length)`` slots (a
symbolic ``min``); a proportional one keeps, per row, ``ceil(f_l * len_i)`` vectors in
``max(2, ceil(f_l * length))`` slots (the per-row counts are a tensor computed from the mask in
the graph, the slots a symbolic expression of the length). The selection is the one of every
other path (ties to the lower index), written with ops ONNX has (TopK, CumSum, Scatter).

``export_onnx`` then runs ONNX Runtime's transformer optimizer (``optimize_model``, model type
``bert``) and, with ``quantize="int8"``, its dynamic quantisation (``quantize_dynamic``, int8
weights). Every file is written to a temporary path and renamed when complete.

int8 keeps a few input channels of the FFN output projections in fp32 by default, in both paths
(``quantize_torch_int8``, ``export_onnx(quantize="int8")``): in BERT-family FFNs a handful of
channels carry outliers both in the GELU activation and in the output projection's weight column
(on the ``make reproduce`` movie-review MiniLM-L6: one channel in layer 1 at activation 24.6
against <= 5.9 for every other, weight 7.9 against <= 1.2), and with per-tensor int8 those few set
the step of the whole projection, activation and weight alike. ``split_outlier_channels`` finds
them from the weights (``outlier_channels``: a column's max |w| >= ``OUTLIER_RATIO`` x the median
column's), moves them last (the FFN input projection permuted alike: the same function) and
splits the output projection (``OutlierSplitLinear``): the bulk in int8 with the scales the
outliers no longer set, the outliers (1-2 of 1,536 channels) in fp32. Measured on the movie-review
PoWER-BERT model (2,000 test sentences, ONNX Runtime, length-sorted batches of 16 / 64 / 256):
-0.05 / -0.30 / -0.30 points to the fp32 baseline (the model's own fp32: -0.30), against
-0.70 / -0.85 / -1.00 for int8 of every projection whole and -0.65 / -0.30 / -1.10 for the earlier
recipe (the first layer's FFN output projection in fp32), at 94% of the speed of int8 of every
projection (1.64x against 1.74x stock ONNX Runtime int8 in the 9-round deploy benchmark,
``benchmarks/results/deploy_cpu.md``; 1.69-1.72x against 1.73-1.74x in standalone A/Bs).
``int8_all=True`` quantises every projection whole, as plain ``quantize_dynamic`` does.
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch

from powerbert.elimination import dispatch
from powerbert.inputs.checks import check_int
from powerbert.inputs.files import atomic_path, check_output
from powerbert.predict import Predictor, inspect_model

OUTPUTS = {
    "sequence-classification": ("logits",),
    "bare": ("last_hidden_state", "kept_mask", "kept_positions"),
    "sentence-transformers": ("sentence_embedding",),
}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSETS = range(18, 24)  # what torch 2.13's exporter and ONNX Runtime 1.32 both take
QUANTIZE = ("int8",)
# Two texts of different lengths: the example batch the exporter traces with (any batch works).
EXAMPLE_TEXTS = ("An example sentence to trace the model with, of a few words more than the other.",
                 "A shorter one.")


class ExportForward(torch.nn.Module):
    """What gets exported: ``forward(input_ids, attention_mask, token_type_ids=None)`` of the
    wrapped model, returning ``OUTPUTS[loader]`` (see the module docstring).

    Args:
        model: a (patched or stock) Hugging Face model or sentence-transformers model.
        loader: ``"sequence-classification"``, ``"bare"`` or ``"sentence-transformers"``.
    """

    def __init__(self, model, loader: str):
        super().__init__()
        self.model = model
        self.loader = loader

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.loader == "sentence-transformers":
            return self.model(inputs)["sentence_embedding"]
        out = self.model(**inputs)
        if self.loader == "sequence-classification":
            return out.logits
        return out.last_hidden_state, out.kept_mask, out.kept_positions


def input_names(model, loader: str) -> tuple[str, ...]:
    """The inputs the model takes, in ``INPUTS`` order."""
    import inspect

    hf = model[0].auto_model if loader == "sentence-transformers" else model
    names = set(inspect.signature(type(hf).forward).parameters)  # the class's: a patched head's is (*a, **k)
    return tuple(name for name in INPUTS if name in names)


def export_program(model, example: dict, loader: str = "sequence-classification"):
    """``torch.export`` a model with dynamic batch and length.

    Args:
        model: a model in eval mode (a patched model takes its static layout while traced).
        example: ``{name: [batch, length] int64 tensor}``, the inputs to trace with.
        loader: what the model is (``OUTPUTS``' keys).

    Returns:
        ``torch.export.ExportedProgram``: ``program.module()(*tensors)``, the inputs in ``INPUTS``
        order, runs it for any batch and length (length >= 2).
    """
    names = tuple(name for name in INPUTS if name in example)
    forward = ExportForward(model, loader).eval()
    with torch.no_grad():
        return torch.export.export(forward, tuple(example[name] for name in names), dynamic_shapes=_dynamic(names))


def export_onnx(model_dir, output, *, max_length: int | None = None, opset: int = 18, quantize: str | None = None,
                optimize: bool = True, overwrite: bool = False, int8_all: bool = False) -> dict:
    """Write the model in ``model_dir`` (patched from its ``config.json``, as ``predict`` runs it)
    as an ONNX file.

    Args:
        model_dir: a model folder ``predict`` takes (classifier, bare encoder, sentence-transformers).
        output: the ``.onnx`` file to write (refused if it exists, unless ``overwrite``).
        max_length: N of the example batch (the graph takes any length up to the model's positions).
        opset: ONNX opset, one of ``OPSETS``.
        quantize: None, or ``"int8"`` (ONNX Runtime dynamic quantisation of the weights).
        optimize: run ONNX Runtime's transformer optimizer (``bert``) on the graph.
        overwrite: replace ``output`` if it exists.
        int8_all: with ``quantize="int8"``, quantise every MatMul whole, as plain
            ``quantize_dynamic`` does (by default the outlier input channels of the FFN output
            projections stay fp32: see the module docstring).

    Returns:
        ``{"output", "inputs", "outputs", "kind", "configuration", "opset", "optimized", "quantize",
        "fp32_matmuls", "fp32_channels", "bytes"}`` (``fp32_matmuls``: the MatMul nodes int8 left in
        fp32; ``fp32_channels``: ``{layer index: [FFN channels]}`` they take, ``split_outlier_channels``).

    Raises:
        ValueError / SystemExit with a one-line message, before anything is written.
    """
    check_int("opset", opset, OPSETS.start, OPSETS.stop - 1)
    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)} or None, got {quantize!r}")
    spec = inspect_model(model_dir, max_length)
    output = check_output(output, folder=False, inputs={"--model": spec.path})
    if output.suffix.lower() != ".onnx":
        raise ValueError(f"output {output} (--output): name the ONNX file *.onnx")
    if output.exists() and not overwrite:
        raise ValueError(f"output {output} (--output) exists; pass --overwrite to replace it")
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise SystemExit("powerbert export needs onnx, onnxscript and onnxruntime: pip install 'powerbert[onnx]'") from None

    predictor = Predictor(spec)
    model = predictor.model
    fuse_qkv(model)  # the copy loaded here, not the user's
    outliers = split_outlier_channels(model) if quantize == "int8" and not int8_all else {}
    names = input_names(model, spec.loader)
    tokenizer = model.tokenizer if spec.loader == "sentence-transformers" else predictor.tokenizer
    batch = tokenizer(list(EXAMPLE_TEXTS), padding=True, truncation=True, max_length=spec.max_length,
                      return_tensors="pt")
    example = {name: batch[name] for name in names}
    forward = ExportForward(model, spec.loader).eval()
    outputs = OUTPUTS[spec.loader]
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".powerbert-export-") as work, atomic_path(output) as tmp:
        exported = Path(work) / "exported.onnx"
        # The graph runs in ONNX Runtime: selection may rely on ONNX TopK's tie order (kernels.select).
        with torch.no_grad(), dispatch.onnx_tie_order():
            program = torch.onnx.export(forward, tuple(example[name] for name in names), dynamo=True,
                                        dynamic_shapes=_dynamic(names), input_names=list(names),
                                        output_names=list(outputs), opset_version=opset, verbose=False)
        program.save(str(exported))
        current = exported
        if optimize:
            current = optimize_onnx(current, Path(work) / "optimized.onnx", _hf_config(model, spec.loader))
        fp32 = []
        if quantize == "int8":
            if outliers:
                fp32 = [name for linear in fp32_outlier_linears(model) for name in matmuls_of(current, linear.weight)]
            # MatMuls only: a quantised embedding Gather of the exported graph is dequantised whole at
            # every run (DequantizeLinear of the vocabulary table: 3% of the int8 movie-review run);
            # stock graphs fuse it into QEmbedLayerNormalization, ours do not.
            current = quantize_onnx_int8(current, Path(work) / "int8.onnx", fp32_nodes=fp32, op_types=("MatMul",))
        tmp.write_bytes(current.read_bytes())
    return {"output": str(output), "inputs": list(names), "outputs": list(outputs), "kind": spec.kind,
            "loader": spec.loader, "configuration": None if spec.retention is None else list(spec.retention),
            "opset": opset, "optimized": optimize, "quantize": quantize, "fp32_matmuls": fp32,
            "fp32_channels": {str(layer): channels for layer, channels in outliers.items()},
            "bytes": output.stat().st_size}


# An input channel of an FFN output projection is an outlier when its weight column's largest
# |w| reaches OUTLIER_RATIO x the median column's: on the make-reproduce movie-review MiniLM-L6 the
# outliers stand at 22-55x (layers 1-4: one channel each, two in layer 3), the next channel at
# <= 9x; the same channels carry the GELU activations' outliers (24.6 against <= 5.9 in layer 1).
OUTLIER_RATIO = 16.0
MAX_OUTLIER_CHANNELS = 8


class OutlierSplitLinear(torch.nn.Module):
    """An FFN output projection split by input channels: ``bulk`` takes the first ``split``
    channels of the input (int8 in a deployment), ``outliers`` the last ones (kept fp32).

    ``forward(x)``: ``x`` ``[..., split + k]`` -> ``bulk(x[..., :split]) + outliers(x[..., split:])``,
    ``[..., out]`` (the bias is ``bulk``'s). Built by ``split_outlier_channels``.
    """

    def __init__(self, bulk: torch.nn.Linear, outliers: torch.nn.Linear):
        super().__init__()
        self.bulk, self.outliers, self.split = bulk, outliers, bulk.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bulk(x[..., :self.split]) + self.outliers(x[..., self.split:])


def outlier_channels(ffn_out: torch.nn.Linear, ratio: float = OUTLIER_RATIO,
                     most: int = MAX_OUTLIER_CHANNELS) -> list[int]:
    """Input channels of ``ffn_out`` (``[out, in]`` weight) whose column's max |w| is at least
    ``ratio`` x the median column's, at most ``most`` of them (the largest), ascending."""
    peak = ffn_out.weight.detach().abs().amax(0).float()
    candidates = peak.argsort(descending=True)[:most]
    return sorted(int(i) for i in candidates if peak[i] >= ratio * peak.median())


def split_outlier_channels(model, ratio: float = OUTLIER_RATIO) -> dict[int, list[int]]:
    """In place: in every encoder layer whose FFN output projection has outlier input channels
    (``outlier_channels``), move those channels last (the FFN input projection's rows and bias and
    the output projection's columns permuted alike: the function is unchanged, the activation is
    elementwise) and replace the output projection by an ``OutlierSplitLinear``, so that dynamic
    int8 can quantise the bulk with scales the outliers no longer set and leave the outliers fp32.

    Args:
        model: a Hugging Face model of a supported family (or its sentence-transformers model),
            its FFN projections plain ``nn.Linear``; layers whose projections are not are skipped.

    Returns:
        ``{layer index: [original channel indices moved last]}`` of the layers split.
    """
    from powerbert.elimination.families import resolve

    hf = _hugging_face(model)
    family, base, _ = resolve(hf)
    names = {id(module): name for name, module in hf.named_modules()}
    split, done = {}, set()
    for index, parts in enumerate(family.layers(family.encoder(base))):
        ffn_in, ffn_out = parts.ffn_in, parts.ffn_out
        if id(ffn_out) in done or type(ffn_in) is not torch.nn.Linear or type(ffn_out) is not torch.nn.Linear:
            continue  # ALBERT's one shared layer is split once; a replaced Linear is left alone
        done.add(id(ffn_out))
        channels = outlier_channels(ffn_out, ratio)
        if not channels:
            continue
        outlying = set(channels)
        keep = [c for c in range(ffn_out.in_features) if c not in outlying]
        order = torch.tensor(keep + channels, device=ffn_out.weight.device)
        weight = ffn_out.weight.detach()
        bulk = torch.nn.Linear(len(keep), ffn_out.out_features, bias=ffn_out.bias is not None,
                               dtype=weight.dtype, device=weight.device)
        outliers = torch.nn.Linear(len(channels), ffn_out.out_features, bias=False, dtype=weight.dtype,
                                   device=weight.device)
        with torch.no_grad():
            ffn_in.weight.copy_(ffn_in.weight[order])
            if ffn_in.bias is not None:
                ffn_in.bias.copy_(ffn_in.bias[order])
            bulk.weight.copy_(weight[:, order[:len(keep)]])
            outliers.weight.copy_(weight[:, order[len(keep):]])
            if ffn_out.bias is not None:
                bulk.bias.copy_(ffn_out.bias)
        hf.set_submodule(names[id(ffn_out)], OutlierSplitLinear(bulk, outliers).train(ffn_out.training))
        split[index] = channels
    return split


def fp32_outlier_linears(model) -> list[torch.nn.Linear]:
    """The ``outliers`` Linears of every ``OutlierSplitLinear`` in ``model`` (what int8 keeps fp32)."""
    return [module.outliers for module in model.modules() if isinstance(module, OutlierSplitLinear)]


def matmuls_of(onnx_path: Path, weight: torch.Tensor) -> list[str]:
    """Names of the MatMul / Gemm nodes of the ONNX file whose constant operand is ``weight``
    (``[out, in]``, as a Linear holds it) or its transpose: how a Linear is found again after
    export and optimisation renamed everything."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    target = weight.detach().cpu().numpy()
    wanted = {name for name, value in ((i.name, numpy_helper.to_array(i)) for i in graph.initializer)
              if value.shape in (target.shape, target.T.shape)
              and (np.array_equal(value, target) or np.array_equal(value, target.T))}
    return [node.name for node in graph.node if node.op_type in ("MatMul", "Gemm") and wanted & set(node.input)]


def fuse_qkv(model) -> int:
    """Give every encoder layer of ``model`` (in place) one Linear holding its query, key and value
    projections stacked (``layer.FUSED_QKV``), which the patched forward then uses: one GEMM, and
    under ONNX Runtime int8 one input quantisation, instead of three. For a model about to be
    exported (``export_onnx`` fuses the copy it loaded); layers whose projections are not plain
    ``nn.Linear`` with biases are left alone.

    Args:
        model: a Hugging Face model of a supported family, or its sentence-transformers model.

    Returns:
        The number of layer modules fused.
    """
    from powerbert.elimination.families import resolve
    from powerbert.elimination.layer import FUSED_QKV

    family, base, _ = resolve(_hugging_face(model))
    fused = 0
    for parts in family.layers(family.encoder(base)):
        linears = (parts.query, parts.key, parts.value)
        if parts.module is None or hasattr(parts.module, FUSED_QKV) or any(
                type(m) is not torch.nn.Linear or m.bias is None for m in linears):
            continue
        weight = parts.query.weight
        stacked = torch.nn.Linear(weight.shape[1], 3 * weight.shape[0], dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            stacked.weight.copy_(torch.cat([m.weight for m in linears]))
            stacked.bias.copy_(torch.cat([m.bias for m in linears]))
        setattr(parts.module, FUSED_QKV, stacked)
        fused += 1
    return fused


def _hugging_face(model):
    """The Hugging Face model inside a sentence-transformers model, or ``model`` itself."""
    from powerbert.sentence_models import hf_model, is_sentence_model

    return hf_model(model) if is_sentence_model(model) else model


def _dynamic(names) -> tuple:
    """Both dimensions of every input dynamic (batch and length), in the forward's argument order."""
    return tuple({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for _ in names)


def _hf_config(model, loader: str):
    return model[0].auto_model.config if loader == "sentence-transformers" else model.config



def quantize_torch_int8(model, *, int8_all: bool = False):
    """``model`` with its ``nn.Linear`` modules in dynamic int8 (``torch.ao.quantization.quantize_dynamic``),
    as a new model (``model`` is not changed; a patched model stays patched).

    By default a copy first gets its FFN outlier channels split off (``split_outlier_channels``),
    and those stay fp32, the rest int8 (see the module docstring). ``int8_all`` quantises every
    Linear whole, as plain ``quantize_dynamic`` does, and takes a model of any family.
    """
    with warnings.catch_warnings():  # torch 2.13 announces the move of quantisation to torchao
        warnings.simplefilter("ignore")
        if int8_all:
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        split = copy.deepcopy(model)
        split_outlier_channels(split)
        keep = {id(linear) for linear in fp32_outlier_linears(split)}
        spec = {name for name, module in split.named_modules() if type(module) is torch.nn.Linear and id(module) not in keep}
        return torch.ao.quantization.quantize_dynamic(split, spec, dtype=torch.qint8, inplace=True)


def quantize_onnx_int8(source: Path, target: Path, *, fp32_nodes=(), op_types=None) -> Path:
    """ONNX Runtime's dynamic quantisation of ``source`` (int8 weights) into ``target``, leaving
    the nodes named in ``fp32_nodes`` (``matmuls_of``) in fp32; ``op_types``: the op types to
    quantise (None: ONNX Runtime's default set, embeddings' Gather included)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=list(fp32_nodes),
                     op_types_to_quantize=None if op_types is None else list(op_types),
                     extra_options={"DefaultTensorType": 1})  # 1: float, for tensors of unknown type
    return target


def optimize_onnx(source: Path, target: Path, config) -> Path:
    """ONNX Runtime's transformer optimizer (``bert``) on ``source`` into ``target`` (fusions of
    LayerNorm, Gelu, and of attention where it finds the stock pattern); ``config`` gives the
    heads and hidden size."""
    from onnxruntime.transformers.optimizer import optimize_model

    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads")
    optimized = optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=hidden)
    optimized.save_model_to_file(str(target))
    return target

