"""Turns the JSON of a ``bench.py --json`` run into the docs' performance table and chart.

Writes ``docs/performance_results.md`` (the ratios against their targets, with the machine
named) and ``docs/_static/bench_ratios.png`` (a bar chart of the speed-ups). ``make bench``
runs it after the benchmark; commit both files when the numbers should be published.

Usage: .venv/bin/python benchmarks/report.py build/bench/results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
CASE_TITLES = {"many": "3000 leaves x 32 float32", "small": "300 leaves, 1 MiB",
               "large": "30 leaves, 256 MiB", "msgpack": "legacy msgpack, 512 MiB TrainState",
               "many-16000": "16000 leaves x 32 float32", "large-1024MiB": "30 leaves, 1 GiB",
               "large-4096MiB": "30 leaves, 4 GiB"}
SERVER_TITLES = {"s3": "S3 (moto)", "gs": "GCS (fake-gcs-server)"}


def case_title(case: str) -> str:
    """``s3-256MiB`` -> "S3 (moto), 256 MiB, 30 leaves"; a local case by its table."""
    scheme, _, size = case.partition("-")
    if scheme in SERVER_TITLES and size.endswith("MiB"):
        return f"{SERVER_TITLES[scheme]}, {size[:-3]} MiB, 30 leaves"
    return CASE_TITLES.get(case, case)


def table(results: dict) -> str:
    env = results["env"]
    lines = [
        f"Measured by `make bench` on {env.get('cpu', '?')} ({env['cpus']} cores), Python "
        f"{env['python']}, jax {env['jax']}, flax {env['flax']}, orbax-checkpoint "
        f"{env['orbax-checkpoint']}, tensorstore {env['tensorstore']}. Times are medians; "
        "ratios divide the medians of one run.",
        "",
        "| case | operation | ratio | measured | target | |",
        "|---|---|---|---|---|---|",
    ]
    for case, data in results["cases"].items():
        for row in data["ratios"]:
            if row["value"] is None:
                continue
            lines.append(f"| {case_title(case)} | {row['op']} | {row['ratio']} | "
                         f"{row['value']:.2f}x | {row['target'] or ''} | {row['verdict'] or ''} |")
    imp = results.get("import", {})
    if "in_process_ms" in imp:
        lines.append(f"| import flaxckpt after jax+flax | | | {imp['in_process_ms']:.0f} ms | "
                     f"<=50 ms | {imp['in_process_verdict']} |")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, values = [], []
    for case, data in results["cases"].items():
        for row in data["ratios"]:
            if row["value"] is not None and row["ratio"].startswith(("orbax/", "flax/")):
                labels.append(f"{case} {row['op']}\n{row['ratio']}")
                values.append(row["value"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(values)), 3.2))
    ax.bar(range(len(values)), values, color="#4c72b0")
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up (x, log scale)")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}x", ha="center", va="bottom", fontsize=7)
    ax.set_title(f"flaxckpt speed-ups, {results['env'].get('cpu', '?')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(json_path: str) -> None:
    results = json.loads(Path(json_path).read_text())
    (DOCS / "performance_results.md").write_text(table(results))
    chart(results, DOCS / "_static" / "bench_ratios.png")
    print(f"wrote {DOCS / 'performance_results.md'} and {DOCS / '_static' / 'bench_ratios.png'}")


if __name__ == "__main__":
    main(sys.argv[1])
