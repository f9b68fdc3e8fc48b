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


def _headline_problems(tmp_path, headline_modes: str, rows: dict) -> list[str]:
    from benchmarks.studies.reproduce.check import problems

    spec = {"name": "movie_reviews", "seed": 0, "headline_seeds": [1, 2], "headline_modes": headline_modes,
            "targets": [], "proportional_targets": []}
    result = {"budget": {"tasks": [spec]},
              "tasks": {"movie_reviews": {"headline": {"seeds": [0, 1, 2], "rows": rows, "goal": {}}}}}
    (tmp_path / "reproduce.json").write_text(json.dumps(result))
    (tmp_path / "reproduce.md").write_text("## Headline rows over 3 seeds\n")
    return [p for p in problems(tmp_path) if ".headline" in p]


def test_the_check_expects_the_headline_rows_of_its_modes(tmp_path):
    """headline_modes 'best' re-runs one retention mode at the other seeds, 'each' both."""
    keys = dict.fromkeys(("test_accuracy", "delta_points", "speedup_vs_dynamic", "ideal_vs_dynamic",
                          "flops_ideal_vs_dynamic"), 1.0)
    three = {"per_seed": [{}, {}, {}], **keys}
    assert _headline_problems(tmp_path, "best", {"baseline": three, "proportional": three}) == []
    assert _headline_problems(tmp_path, "best", {"baseline": three, "fixed": three}) == []
    assert _headline_problems(tmp_path, "best", {"baseline": three}) == [
        "movie_reviews.headline: no fixed or proportional row (headline_modes 'best')"]
    assert _headline_problems(tmp_path, "each", {"baseline": three, "fixed": three}) == [
        "movie_reviews.headline: no proportional row with one entry per seed"]
    assert _headline_problems(tmp_path, "each", {"baseline": three, "fixed": {"per_seed": [{}], **keys},
                                                 "proportional": three}) == [
        "movie_reviews.headline: no fixed row with one entry per seed"]
