"""Reading tables (``powerbert.inputs.tables``): one reader for every command."""
import pytest

from powerbert.inputs.examples import load_examples
from powerbert.inputs.tables import read_table, read_texts


@pytest.mark.parametrize("name, text, message", [
    ("d.csv", "text,text\na,b\n", "d.csv:1: the header names column 'text' twice"),
    ("d.tsv", "label\ttext\ttext\n1\ta\tb\n", "d.tsv:1: the header names column 'text' twice"),
    ("d.jsonl", '{"text": "a"}\n{"text": "a", "label": 1, "text": "b"}\n', "d.jsonl:2: the object names key 'text' twice"),
])
def test_a_column_named_twice_is_refused_wherever_tables_are_read(tmp_path, name, text, message):
    """``text,text`` made predict embed the second field silently (a dict keeps the last one)."""
    path = tmp_path / name
    path.write_text(text)
    for read in (read_table, read_texts, load_examples):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
            read(path)
        assert "\n" not in str(error.value)


def test_distinct_columns_still_read(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,text_pair,label\na,b,1\n")
    assert read_texts(path).pairs == ["b"] and read_table(path).columns == ["text", "text_pair", "label"]
