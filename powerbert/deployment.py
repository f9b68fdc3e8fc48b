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

int8 keeps one projection in fp32 by default, in both paths (``quantize_torch_int8``,
``export_onnx(quantize="int8")``): the first layer's FFN output projection (``first_ffn_out``).
Its input (the GELU of the first FFN, every token of every row) has activation outliers that a
per-tensor dynamic int8 scale cannot hold. On the ``make reproduce`` movie-review PoWER-BERT
model (2,000 test sentences), int8 of every projection cost 0.75 points against the model's fp32
(ORT; torch 1.70), with this one projection in fp32 none (ORT; torch 0.65), for 4.5% of the ORT
int8 model's time on one machine and 13% of its node time on another
(``benchmarks/results/int8_accuracy_movie_reviews.md``, ``benchmarks/results/deploy_cpu.md``).
``int8_all=True`` quantises every projection, as plain ``quantize_dynamic`` does: 1.11x faster
than the default on movie reviews, at 0.55 points more loss there.
"""
from __future__ import annotations

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
        int8_all: with ``quantize="int8"``, quantise every MatMul, the first layer's FFN output
            projection too (by default it stays fp32: see the module docstring).

    Returns:
        ``{"output", "inputs", "outputs", "kind", "configuration", "opset", "optimized", "quantize",
        "fp32_matmuls", "bytes"}`` (``fp32_matmuls``: the MatMul nodes int8 left in fp32).

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
            if not int8_all:
                fp32 = matmuls_of(current, first_ffn_out(model).weight)
            # MatMuls only: a quantised embedding Gather of the exported graph is dequantised whole at
            # every run (DequantizeLinear of the vocabulary table: 3% of the int8 movie-review run);
            # stock graphs fuse it into QEmbedLayerNormalization, ours do not.
            current = quantize_onnx_int8(current, Path(work) / "int8.onnx", fp32_nodes=fp32, op_types=("MatMul",))
        tmp.write_bytes(current.read_bytes())
    return {"output": str(output), "inputs": list(names), "outputs": list(outputs), "kind": spec.kind,
            "loader": spec.loader, "configuration": None if spec.retention is None else list(spec.retention),
            "opset": opset, "optimized": optimize, "quantize": quantize, "fp32_matmuls": fp32,
            "bytes": output.stat().st_size}


def first_ffn_out(model) -> torch.nn.Linear:
    """The first encoder layer's FFN output projection (``LayerParts.ffn_out``) of ``model``
    (a Hugging Face model of a supported family, or its sentence-transformers model)."""
    from powerbert.elimination.families import resolve

    family, base, _ = resolve(_hugging_face(model))
    return family.layers(family.encoder(base))[0].ffn_out


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
    """``model`` with its ``nn.Linear`` modules in dynamic int8 (``torch.ao.quantization.quantize_dynamic``,
    a new model; a patched model stays patched). The first layer's FFN output projection stays
    fp32 unless ``int8_all`` (see the module docstring; ALBERT's one shared layer then stays fp32
    in every application). ``int8_all`` quantises every Linear, as plain ``quantize_dynamic``
    does, and takes a model of any family."""
    spec = {torch.nn.Linear}
    if not int8_all:
        keep = first_ffn_out(model)
        spec = {name for name, module in model.named_modules() if type(module) is torch.nn.Linear and module is not keep}
    with warnings.catch_warnings():  # torch 2.13 announces the move of quantisation to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


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

