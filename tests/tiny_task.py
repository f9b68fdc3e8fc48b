"""A tiny task to train on, shared by the training and command tests: a random BERT small enough
to train in seconds, and a synthetic CSV whose label depends on one token."""
import csv
import random

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from powerbert.training import loop as training_loop

N = 16
LAYERS = 4
WORDS = [f"w{i}" for i in range(40)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "marker"] + WORDS


def make_model_folder(path, layers=LAYERS):
    """A tiny random BERT and its word-level tokenizer, saved like a pretrained model."""
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def write_marker_csv(path, count, seed=0, header=("text", "label")):
    """label = 1 iff the token ``marker`` occurs: only one of 6-13 tokens matters."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(count):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 13))]
            if i % 2:
                words[rng.randrange(len(words))] = "marker"
            writer.writerow([" ".join(words), i % 2])
    return path


def interrupt_at_evaluation(monkeypatch, which: int) -> None:
    """Make the ``which``-th dev evaluation of the next ``pipeline`` call raise KeyboardInterrupt
    (an interruption at the end of an epoch, before its checkpoint); later calls run normally."""
    real_metrics, calls = training_loop.task_metrics, []

    def interrupting(regression):
        compute = real_metrics(regression)

        def metrics(prediction):
            calls.append(1)
            if len(calls) == which:
                monkeypatch.setattr(training_loop, "task_metrics", real_metrics)
                raise KeyboardInterrupt
            return compute(prediction)

        return metrics

    monkeypatch.setattr(training_loop, "task_metrics", interrupting)
