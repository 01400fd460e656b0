"""How save and restore times grow with the number of leaves and with the state's size.

Times flaxckpt, Orbax and bench.py's ``raw`` floor (same contenders, same method: warm-up,
interleaved repeats, medians) on the ``many`` tree at 1k to 64k leaves of 32 floats and on the
``large`` tree (30 leaves) from 64 MiB to 4 GiB, and prints a markdown table with the time per
leaf and per GiB beside each, so linear growth shows as a flat column. Orbax stops at
``--orbax-max-leaves`` (16000 by default: it takes minutes per repeat beyond).

Usage: .venv/bin/python benchmarks/growth.py [--leaves 1000,4000,16000,64000]
           [--mib 64,256,1024,4096] [--repeats 2] [--no-orbax] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

CONTENDERS = ("raw", "flaxckpt", "orbax")


def measure(tree, mods: dict, repeats: int, workdir: Path, with_orbax: bool) -> dict:
    contenders = {"raw": (bench.Raw(), repeats)}
    for name, mod in mods.items():
        if name != "orbax" or with_orbax:
            contenders[name] = (bench.Lib(name, mod), repeats)
    try:
        return bench.bench_contenders(contenders, tree, workdir)
    finally:
        for c, _ in contenders.values():
            c.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _progress(row: dict) -> dict:
    """Prints one measured state (save/restore ms of each contender); returns ``row``."""
    print(f"{row['label']}: " + ", ".join(
        f"{name} {r.get('save_median_ms', float('nan')):.1f}/"
        f"{r.get('restore_median_ms', float('nan')):.1f} ms"
        for name, r in row["results"].items()), flush=True)
    return row


def table(rows: list[dict], unit: str) -> str:
    """A markdown table: one line per size, save and restore ms of each contender, and
    flaxckpt's time per ``unit``."""
    head = ["state"] + [f"{name} {op} ms" for name in CONTENDERS for op in ("save", "restore")]
    head += [f"flaxckpt save per {unit}", f"flaxckpt restore per {unit}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"]]
        for name in CONTENDERS:
            r = row["results"].get(name, {})
            for op in ("save", "restore"):
                value = r.get(f"{op}_median_ms")
                cells.append(f"{value:.1f}" if value is not None else "-")
        fc = row["results"].get("flaxckpt", {})
        for op in ("save", "restore"):
            value = fc.get(f"{op}_median_ms")
            per = value / row["units"] if value is not None else None
            cells.append(f"{per * 1e3:.1f} µs" if per is not None and unit == "leaf"
                         else f"{per:.0f} ms" if per is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--leaves", default="1000,4000,16000,64000")
    p.add_argument("--mib", default="64,256,1024,4096")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--orbax-max-leaves", type=int, default=16000)
    p.add_argument("--no-orbax", action="store_true")
    p.add_argument("--dir", default=str(bench.REPO / "bench_output"))
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    mods = bench.load_libs(a.no_orbax)
    root = Path(a.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="growth-", dir=root))
    by_leaves, by_size = [], []
    try:
        for n in (int(x) for x in a.leaves.split(",") if x):
            tree = bench.make_tree(f"many-{n}")
            res = measure(tree, mods, a.repeats, run_dir / f"leaves-{n}",
                          n <= a.orbax_max_leaves)
            by_leaves.append(_progress({"label": f"{n} leaves", "units": n, "results": res}))
            del tree
            gc.collect()
        for mib in (float(x) for x in a.mib.split(",") if x):
            tree = bench.make_tree("large", mib)
            res = measure(tree, mods, a.repeats, run_dir / f"mib-{mib:g}", True)
            by_size.append(_progress({"label": f"{mib:g} MiB", "units": mib / 1024,
                                      "results": res}))
            del tree
            gc.collect()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            root.rmdir()
        except OSError:
            pass
    print("\nBy number of leaves (32 float32 each):\n")
    print(table(by_leaves, "leaf"))
    print("\nBy size (30 leaves):\n")
    print(table(by_size, "GiB"))
    if a.json:
        Path(a.json).write_text(json.dumps({"leaves": by_leaves, "size": by_size}, indent=1))


if __name__ == "__main__":
    main()
