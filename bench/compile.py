"""Compile benchmark: time, peak memory and bundle size for generated meshes.

    .venv/bin/python bench/compile.py                 # 10, 100, 1000, 5000 services, 5 runs each
    .venv/bin/python bench/compile.py --sizes 1000 --runs 9 --json out.json

Each generated service has three versions, a service-level timeout and retries, a
circuit breaker, an http_route with a header rule, a weighted split and a catch-all,
an authorization allowing the previous service, and one golden request; the services
are spread over files in lib/ that mesh.star loads, as a large real repo would be.
Every run is a fresh `compile_tree` (a fresh evaluation worker included): what
`starmesh compile` does. Side by side, interleaved with those runs, the baseline:
bare starlark-pyo3 evaluating the same files in-process with do-nothing builtins (no
worker, no locations, no checks, no bundle; timed inside its own process) -- the floor
set by the language runtime. Peak RSS: the worker's is read from RUSAGE_CHILDREN,
which on Linux also counts the parent's pages at fork time, so it is an upper bound.
Reports medians, the ratio to the baseline, and the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from starmesh.compiler.compile import compile_tree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402  (bench/ is a folder of scripts, not a package)

SERVICES_PER_FILE = 100


def _service_block(i: int) -> str:
    name = f"svc-{i}"
    caller = f"svc-{i - 1}" if i > 0 else "svc-0"
    return f'''
    service(
        name = "{name}",
        port = 8080,
        versions = ["v1", "v2", "v3"],
        timeout = "2s",
        retries = retries(attempts = 2, per_try_timeout = "500ms"),
        circuit_breaker = circuit_breaker(max_requests = 512),
    )
    http_route("{name}", rules = [
        rule(
            match = [match(path_prefix = "/api/", headers = {{"x-canary": "true"}})],
            backends = {{"v3": 100}},
        ),
        rule(match = [match(path_prefix = "/api/")], backends = {{"v1": 90, "v2": 10}}),
        rule(backends = {{"v1": 100}}),
    ])
    authorization("{name}", rules = [allow(sources = ["{caller}"], methods = ["GET", "POST"])])
    request_test("{name} canary", service = "{name}", path = "/api/x", source = "{caller}",
                 headers = {{"x-canary": "true"}}, backends = "v3")
'''


def write_mesh(root: Path, services: int) -> None:
    """Write a policy tree with `services` services spread over lib/ files."""
    (root / "lib").mkdir(parents=True, exist_ok=True)
    loads = []
    calls = []
    for f, start in enumerate(range(0, services, SERVICES_PER_FILE)):
        body = "".join(_service_block(i) for i in range(start, min(start + SERVICES_PER_FILE, services)))
        (root / "lib" / f"part{f}.star").write_text(f"def declare_part{f}():\n{body}\n")
        loads.append(f'load("//lib/part{f}.star", "declare_part{f}")')
        calls.append(f"declare_part{f}()")
    (root / "mesh.star").write_text(
        "\n".join(loads) + '\n\nmesh(name = "bench", mtls = "strict")\n\n' + "\n".join(calls) + "\n"
    )


def baseline_eval(root: Path) -> None:
    """Evaluate the tree with starlark-pyo3 alone: every builtin a do-nothing callable."""
    import starlark as sl

    from starmesh.compiler.builtins import builtin_names

    texts = {str(p.relative_to(root)): p.read_text() for p in root.rglob("*.star")}
    globals_ = sl.Globals.standard()
    cache: dict[str, sl.FrozenModule] = {}

    def module_for(path: str) -> sl.FrozenModule:
        if path not in cache:
            module = sl.Module()
            for name in builtin_names():
                module.add_callable(name, lambda *args, **kwargs: None)
            sl.eval(module, sl.parse(path, texts[path]), globals_, sl.FileLoader(lambda label: module_for(label[2:])))
            cache[path] = module.freeze()
        return cache[path]

    module_for("mesh.star")


def _baseline_seconds(root: Path) -> float:
    """Time baseline_eval in its own process, so its memory stays out of our figures."""
    out = subprocess.run(
        [sys.executable, __file__, "--baseline-of", str(root)], capture_output=True, text=True, check=True
    ).stdout
    return float(out.strip())


def _children_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run(sizes: list[int], runs: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            root = Path(tmp) / f"mesh-{n}"
            write_mesh(root, n)
            times = []
            base = []
            size = 0
            for _ in range(runs):
                base.append(_baseline_seconds(root))
                start = time.perf_counter()
                result = compile_tree(root)
                times.append(time.perf_counter() - start)
                if not result.ok or result.data is None:
                    first = result.findings[:3]
                    raise SystemExit(f"generated mesh of {n} services did not compile: {first}")
                size = len(result.data)
            rows.append(
                {
                    "services": n,
                    "runs": runs,
                    "median_s": round(statistics.median(times), 4),
                    "min_s": round(min(times), 4),
                    "max_s": round(max(times), 4),
                    "baseline_median_s": round(statistics.median(base), 4),
                    "ratio_to_baseline": round(statistics.median(times) / statistics.median(base), 2),
                    "bundle_bytes": size,
                    "parent_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                    "worker_peak_rss_mb": round(_children_maxrss_mb(), 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--baseline-of", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_of:
        start = time.perf_counter()
        baseline_eval(args.baseline_of)
        print(time.perf_counter() - start)
        return 0
    print(f"machine: {machine()}", flush=True)
    rows = run(args.sizes, args.runs)
    print()
    print("| services | compile median s (min-max) | bare Starlark eval median s | ratio | bundle bytes | worker peak RSS MB | parent peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['services']} | {r['median_s']} ({r['min_s']}-{r['max_s']}) | {r['baseline_median_s']} | "
            f"{r['ratio_to_baseline']}x | {r['bundle_bytes']} | {r['worker_peak_rss_mb']} | {r['parent_peak_rss_mb']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
