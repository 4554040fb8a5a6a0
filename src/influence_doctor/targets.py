"""Turn a TARGET string (`pkg.module:attr` or `path/to/file.py:attr`) into a Pipeline."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from influence_doctor.errors import UsageError
from influence_doctor.pipeline import Pipeline


def load_target(target: str) -> Pipeline:
    """Import TARGET and return its Pipeline; every failure is a UsageError naming what went wrong."""
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise UsageError(f"TARGET {target!r} must look like 'package.module:attr' or 'path/to/file.py:attr'.")
    module = _import_file(module_part) if module_part.endswith(".py") else _import_module(module_part)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"TARGET {target!r}: {module_part} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if isinstance(obj, Pipeline):
        return obj
    if callable(obj):
        try:
            pipeline = obj()
        except Exception as exc:  # the user's factory failed: say so in one line
            raise UsageError(
                f"TARGET {target!r}: calling {attr}() raised {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        if isinstance(pipeline, Pipeline):
            return pipeline
        raise UsageError(
            f"TARGET {target!r}: {attr}() returned {type(pipeline).__name__}, not an influence_doctor.Pipeline."
        )
    raise UsageError(f"TARGET {target!r} is a {type(obj).__name__}, not a Pipeline or a callable returning one.")


def _import_module(name: str):
    # A target in the user's project should import the way pytest would import it: from the cwd.
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise UsageError(f"TARGET module {name!r} cannot be found (is it installed or on the path?).") from exc
        raise UsageError(f"TARGET module {name!r} failed to import: {_first_line(exc)}") from exc
    except Exception as exc:
        raise UsageError(f"TARGET module {name!r} failed to import: {type(exc).__name__}: {_first_line(exc)}") from exc


def _import_file(path_text: str):
    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"TARGET file {path_text!r} does not exist.")
    module_name = f"_influence_doctor_target_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"TARGET file {path_text!r} cannot be loaded as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    # Let the file import its siblings, as running it as a script would.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise UsageError(
            f"TARGET file {path_text!r} failed to import: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
