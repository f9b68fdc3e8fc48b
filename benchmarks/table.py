"""Turn a pytest-benchmark JSON file into a Markdown table (median, ratio within its group).

    python benchmarks/table.py results.json --device "NVIDIA H100" --versions "torch ..."
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_file")
    parser.add_argument("--device", default="unknown")
    parser.add_argument("--versions", default="")
    args = parser.parse_args()
    data = json.load(open(args.json_file))
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or "ungrouped"].append(bench)
    print(f"# Benchmark results: {args.device}\n\n{args.versions}\n")
    for group, benches in groups.items():
        fastest = min(b["stats"]["median"] for b in benches)
        print(f"## {group}\n\n| benchmark | median ms | x fastest | extra |\n|---|---:|---:|---|")
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            extra = {k: v for k, v in b.get("extra_info", {}).items() if k not in ("device", "dtype")}
            print(f"| {b['name']} | {1e3 * b['stats']['median']:.3f} | "
                  f"{b['stats']['median'] / fastest:.2f} | {json.dumps(extra, default=str)[:300]} |")
        print()


if __name__ == "__main__":
    main()
