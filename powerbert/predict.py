"""``powerbert predict``: run a saved model over a corpus, one result per input row, in input order.

    from powerbert.predict import predict
    predict("work/mr_run", "corpus.csv", "scores.jsonl")                     # this process
    predict("work/mr_run", "corpus.csv", "scores.jsonl", engine="ray", num_workers=4)  # Ray Data

What the model folder holds decides what is written (``inspect_model``):

* a sequence-classification model (``*ForSequenceClassification``, e.g. the output of
  ``powerbert train``): ``.jsonl``, one object per input row, ``{"label": ..., "scores": [...]}``:
  the predicted class as in the training data (class names that are integers are written as
  numbers) and the softmax probabilities in class id order (``id2label`` in ``config.json``);
  a regression model writes ``{"label": value}``;
* a bare encoder (``BertModel``, ...) or a sentence-transformers model (``modules.json``):
  ``.npy``, float32 ``[rows, D]`` embeddings: the sentence-transformers pipeline (pooling,
  normalisation) where there is one, else mean pooling over the real tokens that survive
  (``kept_mask``; every real token when the model is not patched).

A folder whose ``config.json`` holds ``powerbert_retention`` is patched from it, as ``powerbert
evaluate`` does (``powerbert.patch(model)``). N is ``--max-length``, else the N the model was
trained at (``powerbert_max_length``), else min(128, positions); a sentence-transformers model
keeps its own ``max_seq_length`` unless ``--max-length`` is given.

Batching (``plan_batches``): rows are sorted by token count (longest first, ties in input order)
and cut into batches of ``batch_size``; each batch is padded to its own longest row. The results
go back to their rows, so the output is in input order whatever the batches were. Both engines
run exactly these batches, so they compute the same numbers: with the same ``threads`` per model
the outputs are byte for byte the same (``tests/test_predict.py``).

Engines: ``local`` runs the batches in this process. ``ray`` runs them on Ray Data
(``map_batches`` with an actor pool of ``num_workers`` actors, one loaded and patched model per
actor, ``threads`` CPU threads each): on the cluster ``ray.init()`` finds (``RAY_ADDRESS``), or on
a local one started for the call. The driver reads the data, plans the batches and writes the
output; the model folder must be readable where the actors run. ``pip install 'powerbert[ray]'``.

Input checks come first and end in a one-line ValueError/SystemExit: the model folder
(``model_folder.check_model_dir``), the output (its suffix fits the model; an existing output is
kept unless ``overwrite``), and every row (a missing or non-text value names file and line; see
``powerbert.inputs.tables.read_texts``). The output is written to a temporary file beside it and renamed when complete,
so an interrupted run never leaves a partial output under the final name.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from powerbert.inputs.checks import check_int
from powerbert.inputs.files import atomic_path, check_output as check_output_path
from powerbert.inputs.tables import Corpus, read_texts
from powerbert.inputs.text_budget import bound_texts
from powerbert.inputs.model_folder import check_model_dir, default_max_length, read_model_config

ENGINES = ("local", "ray")
KINDS = {"classifier": ".jsonl", "embedding": ".npy"}  # what a model gives, and the output it is written to
RETENTION_KEY = "powerbert_retention"  # patch.CONFIG_KEY, without importing torch at parse time
SENTENCE_CONFIG = "sentence_bert_config.json"


# ----------------------------------------------------------------------------- input


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build its predictor (small and picklable: it travels to Ray actors).

    ``kind``: ``"classifier"`` or ``"embedding"``; ``loader``: ``"sequence-classification"``,
    ``"bare"`` or ``"sentence-transformers"``; ``labels``: class names in id order (None for
    regression and embeddings); ``retention``: the configuration in ``config.json`` or None.
    """

    path: str
    kind: str
    loader: str
    max_length: int
    labels: tuple[str, ...] | None
    retention: tuple | None


def inspect_model(path, max_length: int | None = None) -> ModelSpec:
    """Read a model folder's ``config.json`` (no weights loaded) and decide what it predicts.

    Raises:
        SystemExit / ValueError (one line): the folder fails ``check_model_dir``, or its
            ``architectures`` is neither a sequence-classification head nor a bare encoder.
    """
    check_model_dir(path, max_length=max_length)
    config = read_model_config(path)
    path = Path(path)
    architectures = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        kind, loader = "classifier", "sequence-classification"
    elif architectures and all(a.endswith("Model") for a in architectures):
        kind = "embedding"
        loader = "sentence-transformers" if (path / "modules.json").is_file() else "bare"
    else:
        raise ValueError(f"{path / 'config.json'}: architectures {architectures} is neither a sequence-classification "
                         f"model (scores per row) nor a bare encoder (embeddings); powerbert predict runs those")
    if max_length is None:
        if loader == "sentence-transformers":
            saved = _sentence_max_length(path)
            max_length = saved if saved is not None else default_max_length(config)
        else:
            max_length = default_max_length(config)
    labels = None
    if kind == "classifier" and config.get("problem_type") != "regression":
        id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
        labels = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
    retention = config.get(RETENTION_KEY)
    return ModelSpec(str(path), kind, loader, int(max_length), labels, None if retention is None else tuple(retention))


def _sentence_max_length(path: Path) -> int | None:
    file = path / SENTENCE_CONFIG
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8")).get("max_seq_length")
    except (ValueError, OSError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 2 else None


class Predictor:
    """One loaded (and, where its config says so, patched) model: texts in, a float32 array out.

    ``predictor(texts, pairs)`` -> ``[B, C]`` float32: class probabilities (classifier), the
    predicted value (regression, C = 1) or the embeddings (C = D).
    """

    def __init__(self, spec: ModelSpec, threads: int | None = None):
        import torch
        from transformers import AutoTokenizer

        from powerbert.elimination.families import resolve
        from powerbert.front_door import patch
        from powerbert.inputs.model_folder import load_model

        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        if spec.loader == "sentence-transformers":
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise SystemExit(f"{spec.path} is a sentence-transformers model (modules.json): "
                                 f"pip install sentence-transformers to predict with it") from None
            self.model = SentenceTransformer(spec.path, device="cpu", local_files_only=True)
            self.model.max_seq_length = spec.max_length
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
            if spec.loader == "bare":
                from transformers import AutoModel

                self.model = AutoModel.from_pretrained(spec.path, local_files_only=True)
                resolve(self.model)
            else:
                self.model = load_model(spec.path)
            names = set(inspect.signature(self.model.forward).parameters)
            self.input_names = {"input_ids", "attention_mask", "token_type_ids"} & names
        if spec.retention is not None:
            patch(self.model)  # from config.json, as powerbert evaluate does
        self.model.eval()

    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if self.spec.loader == "sentence-transformers":
                return self.model.encode(texts, batch_size=max(1, len(texts)), convert_to_numpy=True,
                                         show_progress_bar=False).astype(np.float32, copy=False)
            batch = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.spec.max_length,
                                   return_tensors="pt")
            out = self.model(**{k: v for k, v in batch.items() if k in self.input_names})
            if self.spec.kind == "classifier":
                logits = out.logits.float()
                values = logits if self.spec.labels is None else torch.softmax(logits, dim=-1)
            else:
                hidden = out.last_hidden_state.float()
                kept = getattr(out, "kept_mask", None)
                mask = (batch["attention_mask"] if kept is None else kept).unsqueeze(-1).to(hidden.dtype)
                values = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            return values.numpy().astype(np.float32, copy=False)


def token_lengths(spec: ModelSpec, corpus: Corpus) -> np.ndarray:
    """``[rows]`` int64: the tokens of every row at ``spec.max_length`` (special tokens included)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    ids = tokenizer(corpus.texts, corpus.pairs, truncation=True, max_length=spec.max_length)["input_ids"]
    return np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))


def plan_batches(lengths, batch_size: int) -> list[np.ndarray]:
    """Row indices of each batch: rows sorted by length, longest first (a stable sort: ties keep
    input order), cut into batches of ``batch_size`` (the last may be smaller)."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------- engines


def _run_local(spec, corpus, batches, threads, on_batch) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        predictor = Predictor(spec, threads)
        for index, rows in enumerate(batches):
            on_batch(index, predictor(*_batch_texts(corpus, rows)))
    finally:
        torch.set_num_threads(before)  # ``threads`` applies to this call, not to the caller's process


def _batch_texts(corpus: Corpus, rows) -> tuple[list[str], list[str] | None]:
    return [corpus.texts[i] for i in rows], None if corpus.pairs is None else [corpus.pairs[i] for i in rows]


class _RayPredictor:
    """The ``map_batches`` actor: one ``Predictor`` per actor; each Ray batch is one planned batch."""

    def __init__(self, spec: ModelSpec, threads: int):
        self.predictor = Predictor(spec, threads)

    def __call__(self, batch: dict) -> dict:
        out = {"batch": [], "values": [], "width": []}
        for index, texts, pairs in zip(batch["batch"], batch["texts"], batch.get("pairs", batch["texts"])):
            values = self.predictor(list(texts), list(pairs) if "pairs" in batch else None)
            out["batch"].append(int(index))
            out["values"].append(values.tobytes())
            out["width"].append(values.shape[1])
        return {"batch": np.array(out["batch"], dtype=np.int64), "values": np.array(out["values"], dtype=object),
                "width": np.array(out["width"], dtype=np.int64)}


def ray_threads(num_workers: int) -> int:
    """CPU threads per actor when none are given: the cluster's CPUs shared by the workers, at
    most one node's (an actor runs on one node)."""
    import ray

    nodes = [node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    total = sum(nodes) or os.cpu_count() or 1
    return max(1, min(int(max(nodes, default=total)), int(total // num_workers)))


def _run_ray(spec, corpus, batches, num_workers, threads, on_batch) -> int:
    try:
        import ray
        import ray.data
    except ImportError:
        raise SystemExit("--engine ray needs Ray Data: pip install 'powerbert[ray]'") from None
    started = not ray.is_initialized()
    if started:  # RAY_ADDRESS names a cluster; otherwise a local one for this call
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # its progress bars are off (ours counts rows), and it warns that they are
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        threads = threads or ray_threads(num_workers)
        items = []
        for index, rows in enumerate(batches):
            texts, pairs = _batch_texts(corpus, rows)
            items.append({"batch": index, "texts": texts, **({} if pairs is None else {"pairs": pairs})})
        dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * num_workers))
        results = dataset.map_batches(_RayPredictor, fn_constructor_kwargs={"spec": spec, "threads": threads},
                                      batch_size=1, batch_format="numpy", num_cpus=threads,
                                      compute=ray.data.ActorPoolStrategy(size=num_workers))
        for row in results.iter_rows():
            values = np.frombuffer(row["values"], dtype=np.float32).reshape(-1, int(row["width"]))
            on_batch(int(row["batch"]), values)
        return threads
    finally:
        data_log.setLevel(level)
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------- output


def check_output(output, spec: ModelSpec, data, overwrite: bool) -> Path:
    """``output`` must end in the suffix the model's kind is written to (``KINDS``), must not
    exist unless ``overwrite``, and must not be the data file or a folder
    (``powerbert.inputs.files.check_output``)."""
    output = Path(output)
    suffix = KINDS[spec.kind]
    if output.suffix.lower() != suffix:
        what = ("class scores, one JSON object per row" if spec.kind == "classifier" else
                f"embeddings ({'sentence-transformers' if spec.loader == 'sentence-transformers' else 'bare encoder'})")
        raise ValueError(f"output {output} (--output): the model in {spec.path} gives {what}, written as a "
                         f"{suffix} file; name the output *{suffix}")
    check_output_path(output, folder=False, inputs={"--data": data, "--model": spec.path})
    if output.exists() and not overwrite:
        raise ValueError(f"output {output} (--output) exists; pass --overwrite to replace it")
    return output


_INTEGER = re.compile(r"-?\d+")


def label_value(name: str):
    """A class name as the training data gave it: integer names as numbers, others as text."""
    return int(name) if _INTEGER.fullmatch(name) else name


def _number(x) -> str:
    """float32 ``x`` as the shortest JSON number that reads back to it (null if not finite)."""
    return str(x) if math.isfinite(x) else "null"


def jsonl_lines(values: np.ndarray, labels: tuple[str, ...] | None):
    """One JSON object per row of ``values`` (``[rows, C]`` float32): see the module docstring."""
    if labels is None:
        for row in values:
            yield f'{{"label": {_number(row[0])}}}\n'
        return
    names = [json.dumps(label_value(name)) for name in labels]
    for row in values:
        best = int(np.argmax(row))
        yield f'{{"label": {names[best]}, "scores": [{", ".join(_number(x) for x in row)}]}}\n'


# ----------------------------------------------------------------------------- predict


def predict(model, data, output, *, text_column: str | None = None, text_pair_column: str | None = None,
            max_length: int | None = None, batch_size: int = 64, engine: str = "local", num_workers: int = 1,
            threads: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Predict every row of ``data`` with the model in ``model`` and write ``output`` (see the
    module docstring).

    Args:
        model: a model folder (``powerbert train``'s output, any supported HF or
            sentence-transformers folder). data: CSV/TSV/JSONL file. output: ``.jsonl``
            (classifiers) or ``.npy`` (embeddings).
        max_length: N (default: the model's, see the module docstring). batch_size: rows per batch.
        engine: ``"local"`` or ``"ray"``. num_workers: Ray actors (``engine="ray"`` only).
        threads: torch CPU threads per model (local default: torch's; Ray default: ``ray_threads``).

    Returns:
        ``{"rows", "batches", "engine", "workers", "threads", "kind", "configuration", "max_length",
        "wall_s", "rows_per_s", "output"}`` (wall_s: the predictions, without reading and writing).

    Raises:
        ValueError / SystemExit with a one-line message, before any model is loaded.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 1),
                             ("max_length", max_length, 2), ("threads", threads, 1)):
        check_int(name, value, low, optional=True)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local" and num_workers != 1:
        raise ValueError(f"--num-workers {num_workers} needs --engine ray (the local engine runs one model)")
    spec = inspect_model(model, max_length)
    output = check_output(output, spec, data, overwrite)
    corpus = read_texts(data, text_column, text_pair_column)
    # Bounded before any tokenizer sees them (text_budget: a huge pair would exhaust memory).
    corpus = dataclasses.replace(corpus, texts=bound_texts(corpus.texts, spec.max_length),
                                 pairs=bound_texts(corpus.pairs, spec.max_length))
    if corpus.pairs is not None and spec.kind == "embedding":
        raise ValueError(f"the model in {spec.path} embeds single texts; {data} has a text pair column "
                         f"(pass --text-column alone, or use a sequence-pair classifier)")
    batches = plan_batches(token_lengths(spec, corpus), batch_size)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(corpus), desc=f"predict ({engine})", unit="rows", disable=not progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    store: dict = {}
    start = time.perf_counter()
    try:
        with atomic_path(output) as tmp:  # the old output stays until the new one is complete

            def on_batch(index: int, values: np.ndarray) -> None:
                rows = batches[index]
                if "values" not in store:  # the first batch tells the width
                    shape = (len(corpus), values.shape[1])
                    store["values"] = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
                                       if spec.kind == "embedding" else np.empty(shape, dtype=np.float32))
                store["values"][rows] = values
                bar.update(len(rows))

            if engine == "local":
                _run_local(spec, corpus, batches, threads, on_batch)
                used_threads = threads
            else:
                used_threads = _run_ray(spec, corpus, batches, num_workers, threads, on_batch)
            wall = time.perf_counter() - start
            bar.close()
            values = store["values"]
            if spec.kind == "embedding":
                values.flush()
                del store["values"], values
            else:
                with tmp.open("w", encoding="utf-8") as f:
                    f.writelines(jsonl_lines(values, spec.labels))
    finally:
        bar.close()
        store.clear()
    if used_threads is None:
        import torch

        used_threads = torch.get_num_threads()
    return {"rows": len(corpus), "batches": len(batches), "engine": engine, "workers": num_workers,
            "threads": used_threads, "kind": spec.kind, "configuration": None if spec.retention is None else list(
                spec.retention), "max_length": spec.max_length, "wall_s": round(wall, 3),
            "rows_per_s": round(len(corpus) / wall, 1) if wall > 0 else None, "output": str(output)}
