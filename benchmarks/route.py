"""The route of one `diagnose` call: how often it crosses between the package's modules, and which ways.

Runs `diagnose` on a built-in demo (default `uci-mlp`, healthy, probes on) with a profiler hook that sees
every call from a function of one module of the package into a function of another, and prints:

- calls between modules: every such call, as it happened (a check called once per module is counted once
  per module);
- doors: the distinct (caller module, callee module) pairs used;
- doors up: the doors whose callee sits in a higher layer than the caller (`tests/test_architecture.py`'s
  LAYERS), that is, a lower module calling back into a higher one through a function it was handed;
- visits: per module, how many calls entered it from another module.

Usage: `python benchmarks/route.py [--demo uci-mlp] [--package-root src]` (run it from the repository root;
`--package-root` points at another checkout's `src` to measure it the same way).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path


def module_of(filename: str, root: Path) -> str | None:
    """`influence_doctor.x.y` for a file of the package under `root`, else None."""
    try:
        relative = Path(filename).resolve().relative_to(root.resolve())
    except ValueError:
        return None
    if relative.parts[0] != "influence_doctor":
        return None
    return ".".join(relative.with_suffix("").parts).removesuffix(".__init__")


def trace(demo: str, root: Path) -> Counter[tuple[str, str]]:
    """Calls between modules of one diagnosis, by (caller module, callee module)."""
    sys.path.insert(0, str(root))
    from influence_doctor.demos import load_demo
    from influence_doctor.doctor import diagnose

    crossings: Counter[tuple[str, str]] = Counter()
    modules: dict[str, str | None] = {}

    def where(code) -> str | None:
        name = code.co_filename
        if name not in modules:
            modules[name] = module_of(name, root)
        return modules[name]

    def hook(frame, event, _arg) -> None:
        if event != "call":
            return
        callee = where(frame.f_code)
        caller_frame = frame.f_back
        caller = where(caller_frame.f_code) if caller_frame is not None else None
        if callee and caller and callee != caller:
            crossings[(caller, callee)] += 1

    pipeline = load_demo(demo)
    with tempfile.TemporaryDirectory() as out:
        sys.setprofile(hook)
        try:
            diagnose(pipeline, out_dir=out, progress=False)
        finally:
            sys.setprofile(None)
    return crossings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="uci-mlp")
    parser.add_argument("--package-root", default="src", help="the folder holding the influence_doctor package")
    args = parser.parse_args()
    root = Path(args.package_root)
    crossings = trace(args.demo, root)
    layer = _layers()
    doors = sorted(crossings)
    up = [(a, b) for a, b in doors if layer and layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    visits = Counter()
    for (_caller, callee), count in crossings.items():
        visits[callee] += count
    print(f"diagnose --demo {args.demo}, package at {root}")
    print(f"  calls between modules: {sum(crossings.values())}")
    print(f"  doors (distinct caller → callee module pairs): {len(doors)}")
    listed = ", ".join(f"{a} → {b}" for a, b in up)
    print(f"  doors up the layering: {len(up)}" + (f" ({listed})" if up else ""))
    print(
        "  most visited: " + ", ".join(f"{m.removeprefix('influence_doctor.')} {n}" for m, n in visits.most_common(8))
    )
    return 0


def _layers():
    """The layer of a module by tests/test_architecture.py's LAYERS (None when it is not importable)."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.test_architecture import layer_of
    except Exception:  # measuring another checkout: its layers are not this one's
        return None

    def layer(module: str) -> int | None:
        try:
            return layer_of(module)
        except AssertionError:
            return None

    return layer


if __name__ == "__main__":
    sys.exit(main())
