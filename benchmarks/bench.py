"""Side-by-side checkpoint benchmark: flaxckpt vs Orbax vs a raw-bytes floor.

What is measured (one run, one process, JAX on CPU):

* ``flaxckpt`` and ``orbax``: ``StandardCheckpointer().save(path, args=StandardSave(tree))``
  (plus ``wait_until_finished()`` so the save is complete) and
  ``restore(path, args=StandardRestore(abstract_tree))`` followed by
  ``jax.block_until_ready``, with ``abstract_tree = jax.tree.map(
  utils.to_shape_dtype_struct, tree)``.  Orbax releases whose
  ``StandardCheckpointer.save`` takes no ``args=`` keyword (e.g. 0.12.x) get the
  equivalent ``save(path, tree)`` / ``restore(path, abstract_tree)``, which wrap
  ``StandardSave`` / ``StandardRestore`` themselves.
* ``raw``: the floor.  All leaves' bytes are written sequentially into ONE file
  (each leaf at a 64-byte-aligned offset), then ``flush`` + ``os.fsync``;
  restore does one ``readinto`` of the whole file into a 64-byte-aligned
  buffer, slices it with ``np.frombuffer`` and ``jax.device_put``s the arrays
  (zero-copy on CPU for aligned memory; ~30-40 us per leaf regardless).

Each contender builds its checkpointer once per case (untimed), does one
untimed warm-up save+restore (which is also checked for bit-exact round trip,
column ``check``), then R timed repeats, each saving into a fresh directory
under ``--dir`` and restoring from it.  ``os.sync()`` + ``gc.collect()`` run
(untimed) before every timed operation, so earlier writeback doesn't leak
into later timings.  Restores read from the page cache (nothing drops caches).
Medians are reported.

Cases (float32 jax.Arrays, standard normal values from a fixed seed):
  many   3000 leaves x 32 floats (100 layers x 30 params)
  small  300 leaves totalling 1 MiB
  large  ~256 MiB in 30 leaves (params + momentum of a small transformer-ish
         model; ``--large-mib`` rescales it for quick runs)

How to read the ratios:
  orbax/flaxckpt   Orbax time divided by flaxckpt time: speed-up, higher is better.
  flaxckpt/raw     flaxckpt time divided by the raw floor: overhead, lower is
                   better; 1.0 means flaxckpt is as fast as dumping bytes.
Targets are printed next to the ratios with PASS/MISS; nothing is asserted.

Import time: fresh ``sys.executable -c`` subprocesses time ``import jax, flax``
alone and ``import jax, flax; import flaxckpt``; the difference of the medians
is the import cost of flaxckpt (target <= 50 ms).  On a busy machine that
difference of two ~1 s medians is noisy, so the median time of ``import
flaxckpt`` itself, measured inside the subprocess after ``jax`` and ``flax``
are loaded, is reported (and judged) too.  The subprocess also reports
whether ``import flaxckpt`` pulled any ``orbax*`` module into ``sys.modules``.

Usage:  .venv/bin/python benchmarks/bench.py [--cases many,small,large]
            [--repeats N] [--no-orbax] [--json out.json] [--help for more]
"""
from __future__ import annotations

import argparse, gc, importlib.metadata, inspect, json, math, os, platform, shutil, statistics
import subprocess, sys, tempfile, time, traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

MiB = 1 << 20
SEED = 0
CASES = ("many", "small", "large")
# (case, op, ratio) -> (comparison, target)
TARGETS = {
    ("many", "save", "orbax/flaxckpt"): (">=", 50.0),
    ("many", "restore", "orbax/flaxckpt"): (">=", 20.0),
    ("small", "save", "orbax/flaxckpt"): (">=", 20.0),
    ("small", "restore", "orbax/flaxckpt"): (">=", 10.0),
    ("large", "save", "flaxckpt/raw"): ("<=", 1.25),
    ("large", "restore", "flaxckpt/raw"): ("<=", 1.10),
}
IMPORT_TARGET_MS = 50.0


# ----------------------------------------------------------------- trees
def make_tree(case: str, large_mib: float = 256.0) -> dict:
    rng = np.random.default_rng(SEED)
    arr = lambda *shape: jax.device_put(rng.standard_normal(shape, dtype=np.float32))
    if case == "many":
        return {f"layer_{i:03d}": {f"param_{j:02d}": arr(32) for j in range(30)}
                for i in range(100)}
    if case == "small":  # 300 leaves, exactly 1 MiB in total
        n, k = divmod(MiB // 4, 300)
        sizes = [n + (i < k) for i in range(300)]
        return {f"layer_{i:02d}": {f"param_{j:02d}": arr(sizes[30 * i + j]) for j in range(30)}
                for i in range(10)}
    if case == "large":  # bytes = 256 * d**2 -> d = 1024 gives 256 MiB, 30 leaves
        d = max(8, round(1024 * math.sqrt(large_mib / 256)))
        def params():
            p = {"embed": {"embedding": arr(16 * d, d)}}
            for b in range(4):
                p[f"block_{b}"] = {"kernel": arr(d, 4 * d), "bias": arr(4 * d), "scale": arr(d)}
            p["final_norm"] = {"scale": arr(d), "bias": arr(d)}
            return p
        return {"params": params(), "opt_state": {"momentum": params()}}
    raise ValueError(f"unknown case {case!r}")


def trees_equal(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------- contenders
class Raw:
    """The floor: one file, sequential writes, fsync; one readinto on restore.

    Leaves start at 64-byte-aligned offsets (zero padding in between) and are
    read into one 64-byte-aligned buffer: JAX's CPU backend then makes
    ``jax.device_put`` zero-copy (it aliases aligned host memory), which is
    what the fastest possible jax.Array restore would do.
    """
    name = "raw"
    ALIGN = 64

    def abstract(self, tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

    def _layout(self, leaves):
        offsets, end = [], 0
        for x in leaves:
            offsets.append(end)
            end += -(-math.prod(x.shape) * np.dtype(x.dtype).itemsize // self.ALIGN) * self.ALIGN
        return offsets, end

    def save(self, path: Path, tree) -> None:
        path.mkdir(parents=True)
        leaves = jax.tree.leaves(tree)
        offsets, end = self._layout(leaves)
        with open(path / "data.bin", "wb") as f:
            for x, off in zip(leaves, offsets):
                f.write(b"\0" * (off - f.tell()))  # padding up to this leaf's offset
                f.write(np.ascontiguousarray(np.asarray(x)).data)
            f.write(b"\0" * (end - f.tell()))
            f.flush()
            os.fsync(f.fileno())

    def restore(self, path: Path, abstract):
        leaves, treedef = jax.tree.flatten(abstract)
        offsets, end = self._layout(leaves)
        raw = np.empty(end + self.ALIGN, np.uint8)
        start = -raw.ctypes.data % self.ALIGN
        buf = raw[start:start + end]
        with open(path / "data.bin", "rb", buffering=0) as f:
            f.readinto(buf)
        out = [np.frombuffer(buf, a.dtype, math.prod(a.shape), off).reshape(a.shape)
               for a, off in zip(leaves, offsets)]
        return jax.block_until_ready(jax.tree.unflatten(treedef, jax.device_put(out)))

    def close(self) -> None:
        pass


class Lib:
    """flaxckpt or orbax.checkpoint through the StandardCheckpointer API."""

    def __init__(self, name: str, mod):
        self.name, self.mod = name, mod
        self.ckptr = mod.StandardCheckpointer()
        self.args_save = self._takes_args(self.ckptr.save)
        self.args_restore = self._takes_args(self.ckptr.restore)

    @staticmethod
    def _takes_args(fn) -> bool:
        ps = inspect.signature(fn).parameters.values()
        return any(p.name == "args" or p.kind is p.VAR_KEYWORD for p in ps)

    def abstract(self, tree):
        return jax.tree.map(self.mod.utils.to_shape_dtype_struct, tree)

    def save(self, path: Path, tree) -> None:
        if self.args_save:
            self.ckptr.save(path, args=self.mod.args.StandardSave(tree))
        else:
            self.ckptr.save(path, tree)
        if hasattr(self.ckptr, "wait_until_finished"):
            self.ckptr.wait_until_finished()

    def restore(self, path: Path, abstract):
        if self.args_restore:
            out = self.ckptr.restore(path, args=self.mod.args.StandardRestore(abstract))
        else:
            out = self.ckptr.restore(path, abstract)
        return jax.block_until_ready(out)

    def close(self) -> None:
        if hasattr(self.ckptr, "close"):
            self.ckptr.close()


def load_libs(no_orbax: bool) -> dict:
    mods = {}
    try:
        import flaxckpt as fc
        fc.StandardCheckpointer, fc.args.StandardSave, fc.args.StandardRestore
        fc.utils.to_shape_dtype_struct
        mods["flaxckpt"] = fc
    except Exception as e:  # library under construction: skip, don't die
        print(f"NOTE: skipping flaxckpt ({type(e).__name__}: {e})")
    if not no_orbax:
        import orbax.checkpoint as ocp
        mods["orbax"] = ocp
    return mods


# -------------------------------------------------------------- timing
def timed(fn, *a):
    os.sync()
    gc.collect()
    t0 = time.perf_counter()
    out = fn(*a)
    return (time.perf_counter() - t0) * 1e3, out


def bench_contender(c, tree, reps: int, workdir: Path) -> dict:
    abstract = c.abstract(tree)
    c.save(workdir / "warmup", tree)  # warm-up (untimed) + correctness check
    ok = trees_equal(tree, c.restore(workdir / "warmup", abstract))
    shutil.rmtree(workdir / "warmup")
    saves, restores = [], []
    for i in range(reps):
        path = workdir / f"rep{i}"
        saves.append(timed(c.save, path, tree)[0])
        ms, out = timed(c.restore, path, abstract)
        restores.append(ms)
        del out
        shutil.rmtree(path)
    return {"reps": reps, "save_ms": saves, "restore_ms": restores, "check": "ok" if ok else "MISMATCH",
            "save_median_ms": statistics.median(saves), "restore_median_ms": statistics.median(restores)}


def ratios(case: str, res: dict) -> list[dict]:
    rows = []
    for num, den in (("orbax", "flaxckpt"), ("flaxckpt", "raw")):
        for op in ("save", "restore"):
            name = f"{num}/{den}"
            a, b = res.get(num, {}), res.get(den, {})
            val = (a[f"{op}_median_ms"] / b[f"{op}_median_ms"]
                   if f"{op}_median_ms" in a and f"{op}_median_ms" in b else None)
            cmp_, tgt = TARGETS.get((case, op, name), (None, None))
            verdict = None
            if tgt is not None and val is not None:
                verdict = "PASS" if (val >= tgt if cmp_ == ">=" else val <= tgt) else "MISS"
            rows.append({"op": op, "ratio": name, "value": val, "target": f"{cmp_}{tgt}x" if tgt else None,
                         "verdict": verdict})
    return rows


def print_case(case: str, tree, res: dict, rats: list[dict]) -> None:
    leaves = jax.tree.leaves(tree)
    nbytes = sum(x.nbytes for x in leaves)
    print(f"\n== case {case}: {len(leaves)} leaves, {nbytes / MiB:.2f} MiB ==")
    print(f"{'contender':<10} {'reps':>4} {'save ms':>10} {'restore ms':>11} {'save MiB/s':>11} "
          f"{'rest MiB/s':>11}  check")
    for name, r in res.items():
        if "error" in r:
            print(f"{name:<10} ERROR: {r['error']}")
            continue
        s, rt = r["save_median_ms"], r["restore_median_ms"]
        print(f"{name:<10} {r['reps']:>4} {s:>10.2f} {rt:>11.2f} {nbytes / MiB / (s / 1e3):>11.1f} "
              f"{nbytes / MiB / (rt / 1e3):>11.1f}  {r['check']}")
    for row in rats:
        if row["value"] is None:
            continue
        tgt = f"target {row['target']:<7} {row['verdict']}" if row["target"] else ""
        print(f"  {row['op']:<8}{row['ratio']:<15}{row['value']:>9.2f}x   {tgt}")


# --------------------------------------------------------- import time
IMPORT_SNIPPET = """
import sys, time, json
t0 = time.perf_counter()
import jax, flax
t1 = time.perf_counter()
before = {m for m in sys.modules if m.startswith("orbax")}
%s
t2 = time.perf_counter()
after = sorted(m for m in sys.modules if m.startswith("orbax") and m not in before)
print(json.dumps({"total": t2 - t0, "incr": t2 - t1, "orbax": after}))
"""


def bench_import(runs: int) -> dict:
    # Users import from cached bytecode; a session with PYTHONDONTWRITEBYTECODE set would time
    # compiling every module instead. Allow .pyc files and warm them with one untimed import.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-c", "import jax, flax, flaxckpt"], cwd=REPO, env=env,
                   capture_output=True, check=False)

    def once(extra: str) -> dict:
        p = subprocess.run([sys.executable, "-c", IMPORT_SNIPPET % extra], cwd=REPO, env=env,
                           capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed")
        return json.loads(p.stdout.strip().splitlines()[-1])

    base, withfc, incr, orbax_mods = [], [], [], set()
    for _ in range(runs):  # interleave to spread machine noise evenly
        base.append(once("pass")["total"] * 1e3)
        r = once("import flaxckpt")
        withfc.append(r["total"] * 1e3)
        incr.append(r["incr"] * 1e3)
        orbax_mods.update(r["orbax"])
    diff = statistics.median(withfc) - statistics.median(base)
    return {"runs": runs, "jax_flax_ms": statistics.median(base), "with_flaxckpt_ms": statistics.median(withfc),
            "diff_ms": diff, "in_process_ms": statistics.median(incr),
            "in_process_verdict": "PASS" if statistics.median(incr) <= IMPORT_TARGET_MS else "MISS", "target_ms": IMPORT_TARGET_MS, "verdict": "PASS" if diff <= IMPORT_TARGET_MS else "MISS",
            "orbax_modules": sorted(orbax_mods)}


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma list of many,small,large")
    p.add_argument("--repeats", type=int, help="repeats for every contender and case (overrides below)")
    p.add_argument("--fc-repeats", type=int, default=5)
    p.add_argument("--raw-repeats", type=int, default=5)
    p.add_argument("--orbax-repeats", type=int, default=3)
    p.add_argument("--orbax-many-repeats", type=int, default=2, help="Orbax repeats on the slow many-leaf case")
    p.add_argument("--case-repeats", default="", help="per-case override for all contenders, e.g. many=1,large=3")
    p.add_argument("--no-orbax", action="store_true", help="skip Orbax")
    p.add_argument("--large-mib", type=float, default=256.0, help="size of the large case (default 256)")
    p.add_argument("--import-runs", type=int, default=5, help="subprocesses per import variant (0 = skip)")
    p.add_argument("--dir", default=str(REPO / "bench_output"), help="scratch root (run dirs are wiped)")
    p.add_argument("--json", help="also dump results to this JSON file")
    a = p.parse_args(argv)
    a.cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = set(a.cases) - set(CASES)
    if bad:
        p.error(f"unknown case(s): {', '.join(sorted(bad))}")
    a.case_repeats = {k: int(v) for k, v in (kv.split("=") for kv in a.case_repeats.split(",") if kv)}
    return a


def repeats_for(a, case: str, name: str) -> int:
    if case in a.case_repeats:
        return a.case_repeats[case]
    if a.repeats is not None:
        return a.repeats
    if name == "orbax":
        return a.orbax_many_repeats if case == "many" else a.orbax_repeats
    return a.fc_repeats if name == "flaxckpt" else a.raw_repeats


def main(argv=None) -> None:
    a = parse_args(argv)
    mods = load_libs(a.no_orbax)
    vers = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
            "cpus": os.cpu_count(), "loadavg": os.getloadavg()[0]}
    for dist in ("flax", "orbax-checkpoint", "tensorstore"):
        try:
            vers[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            vers[dist] = "-"
    vers["flaxckpt"] = getattr(mods.get("flaxckpt"), "__version__", "?") if "flaxckpt" in mods else "-"
    print("env: " + ", ".join(f"{k} {v}" for k, v in vers.items()))

    root = Path(a.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("run-*"):  # wipe leftovers of interrupted runs
        shutil.rmtree(stale, ignore_errors=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    results = {"env": vers, "cases": {}}
    try:
        for case in a.cases:
            tree = make_tree(case, a.large_mib)
            res = {}
            for name in ("raw", *mods):
                try:
                    c = Raw() if name == "raw" else Lib(name, mods[name])
                    try:
                        res[name] = bench_contender(c, tree, repeats_for(a, case, name), run_dir / case / name)
                    finally:
                        c.close()
                except Exception as e:
                    res[name] = {"error": "".join(traceback.format_exception_only(e)).strip()}
                    print(f"NOTE: {name} failed on case {case}: {res[name]['error']}")
            rats = ratios(case, res)
            print_case(case, tree, res, rats)
            results["cases"][case] = {"leaves": len(jax.tree.leaves(tree)),
                                      "bytes": sum(x.nbytes for x in jax.tree.leaves(tree)),
                                      "results": res, "ratios": rats}
            del tree
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            root.rmdir()  # only succeeds when empty
        except OSError:
            pass

    if a.import_runs > 0:
        print(f"\n== import time (median of {a.import_runs} fresh subprocesses each) ==")
        try:
            imp = bench_import(a.import_runs)
            print(f"  import jax, flax            {imp['jax_flax_ms']:8.1f} ms")
            print(f"  import jax, flax, flaxckpt  {imp['with_flaxckpt_ms']:8.1f} ms")
            print(f"  flaxckpt import cost        {imp['diff_ms']:8.1f} ms   target <={IMPORT_TARGET_MS:.0f} ms "
                  f"{imp['verdict']}")
            print(f"  in-process: import flaxckpt {imp['in_process_ms']:8.1f} ms   target <={IMPORT_TARGET_MS:.0f} ms "
                  f"{imp['in_process_verdict']}  (same quantity, measured directly after jax+flax; less noisy)")
            mods_ = imp["orbax_modules"]
            print(f"  orbax modules pulled in by import flaxckpt: {', '.join(mods_[:5]) + ('...' if len(mods_) > 5 else '') if mods_ else 'none'}")
        except Exception as e:
            imp = {"error": str(e)}
            print(f"  NOTE: import timing failed: {e}")
        results["import"] = imp

    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
        print(f"\nresults written to {a.json}")


if __name__ == "__main__":
    main()
