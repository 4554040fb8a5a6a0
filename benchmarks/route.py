"""The route of one `diagnose` call: how often it crosses between the package's modules, and which ways.

Runs `diagnose` on a built-in demo (default `uci-mlp`, healthy, probes on) under a profiler hook that
sees every call from a function of one module of the package into a function of another, and prints:

- moves: the calls between modules whose callee goes on to call into another module itself, i.e. the
  control passing from module to module, leaving out reads of a value another module holds (a property,
  a small pure helper) that return without going anywhere;
- calls between modules: every such call, reads included;
- doors: the distinct (caller module, callee module) pairs used, and those whose callee sits in a higher
  layer than the caller (`tests/test_architecture.py`'s LAYERS): a function handed down and called back;
- the modules entered most often.

Usage, from the repository root: `python benchmarks/route.py [--demo uci-mlp] [--package-root src]`
(`--package-root` points at another checkout's `src` to measure it the same way).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
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


@dataclass
class Route:
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)  # every call between modules
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)  # those whose callee went further


def trace(demo: str, root: Path) -> Route:
    """The calls between modules of one diagnosis of `demo`, by (caller module, callee module)."""
    sys.path.insert(0, str(root.resolve()))
    from influence_doctor.demos import load_demo
    from influence_doctor.doctor import diagnose

    route = Route()
    modules: dict[str, str | None] = {}
    stack: list[list | None] = []  # per frame: [module, crossed in, crossed out, caller module]

    def where(code) -> str | None:
        if code.co_filename not in modules:
            modules[code.co_filename] = module_of(code.co_filename, root)
        return modules[code.co_filename]

    def hook(frame, event, _arg) -> None:
        if event == "call":
            module = where(frame.f_code)
            if module is None:
                stack.append(None)
                return
            caller = next((entry for entry in reversed(stack) if entry is not None), None)
            crossed = caller is not None and caller[0] != module
            if crossed:
                caller[2] = True
                route.calls[(caller[0], module)] += 1
            stack.append([module, crossed, False, caller[0] if caller else None])
        elif event == "return" and stack:
            entry = stack.pop()
            if entry is not None and entry[1] and entry[2]:
                route.moves[(entry[3], entry[0])] += 1

    pipeline = load_demo(demo)
    with tempfile.TemporaryDirectory() as out:
        sys.setprofile(hook)
        try:
            diagnose(pipeline, out_dir=out, progress=False)
        finally:
            sys.setprofile(None)
    return route


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="uci-mlp")
    parser.add_argument("--package-root", default="src", help="the folder holding the influence_doctor package")
    args = parser.parse_args()
    root = Path(args.package_root)
    route = trace(args.demo, root)
    layer = _layers()
    doors = sorted(route.calls)
    up = [(a, b) for a, b in doors if layer is not None and None not in (layer(a), layer(b)) and layer(b) > layer(a)]
    entered: Counter[str] = Counter()
    for (_caller, callee), count in route.moves.items():
        entered[callee] += count
    short = lambda name: name.removeprefix("influence_doctor.")  # noqa: E731
    print(f"diagnose --demo {args.demo}, package at {root}")
    print(f"  moves between modules: {sum(route.moves.values())} (through {len(route.moves)} doors)")
    print(f"  calls between modules, reads included: {sum(route.calls.values())} (through {len(doors)} doors)")
    listed = ", ".join(f"{short(a)} → {short(b)}" for a, b in up)
    print(f"  doors up the layering: {len(up) if layer is not None else 'not known'}" + (f" ({listed})" if up else ""))
    print("  entered most: " + ", ".join(f"{short(m)} {n}" for m, n in entered.most_common(8)))
    return 0


def _layers():
    """A module's layer in tests/test_architecture.py's LAYERS, or None (another checkout's layers differ)."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.test_architecture import layer_of
    except Exception:
        return None

    def layer(module: str) -> int | None:
        try:
            return layer_of(module)
        except AssertionError:
            return None

    return layer


if __name__ == "__main__":
    sys.exit(main())
