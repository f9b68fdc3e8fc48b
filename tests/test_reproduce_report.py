"""The reproduce study's results files when a budget's tasks run as separate invocations."""
import json

from benchmarks.studies.reproduce.report import merge_earlier_tasks


def _result(budget: str, tasks: dict, commit: str = "new") -> dict:
    return {"commit": commit, "finished_at": "today",
            "budget": {"name": budget, "tasks": [{"name": "movie_reviews"}, {"name": "bbc_news"}]},
            "tasks": tasks}


def test_a_later_task_keeps_the_earlier_one_in_budget_order(tmp_path):
    (tmp_path / "reproduce_mpnet.json").write_text(json.dumps(_result("mpnet-full", {"movie_reviews": {"a": 1}}, "old")))
    result = _result("mpnet-full", {"bbc_news": {"b": 2}})
    result["budget"]["results_name"] = "reproduce_mpnet"
    merged = merge_earlier_tasks(result, tmp_path)
    assert list(merged["tasks"]) == ["movie_reviews", "bbc_news"]
    assert merged["tasks"]["movie_reviews"] == {"a": 1}
    assert merged["earlier_tasks"] == {"movie_reviews": {"commit": "old", "finished_at": "today"}}
    assert "earlier_tasks" not in result  # the argument is not mutated


def test_a_rerun_task_replaces_its_earlier_block(tmp_path):
    (tmp_path / "reproduce.json").write_text(json.dumps(_result("full", {"movie_reviews": {"a": 1}})))
    merged = merge_earlier_tasks(_result("full", {"movie_reviews": {"a": 2}}), tmp_path)
    assert merged["tasks"] == {"movie_reviews": {"a": 2}}
    assert merged.get("earlier_tasks") == {}


def test_another_budgets_file_is_never_merged(tmp_path):
    (tmp_path / "reproduce.json").write_text(json.dumps(_result("quick", {"movie_reviews": {"a": 1}})))
    result = _result("full", {"bbc_news": {"b": 2}})
    assert merge_earlier_tasks(result, tmp_path) is result
