"""The true Fisher's sampled targets, drawn the same way in every trial.

With kronfluence's default (`use_empirical_fisher=False`) the covariance and lambda stages call the Task's
`compute_train_loss(sample=True)`, which draws targets from the model's own predictions. torch draws a
float32 and a float64 normal from the same seed as different numbers (the generator makes each dtype's
values its own way), so a float64 reference run would see other targets than the run it checks, and a run
at another batch size would hand each example other random numbers. Either comparison would then mix
Monte-Carlo noise into what it claims to measure.

While a stage runs, `drawing(seed)` makes the Task's draws a function of the seed and of the example only:
every random function a Task uses to sample (`torch.normal`, `torch.randn_like`, `torch.multinomial`,
`torch.bernoulli`, a `torch.distributions` sample, ...) draws in float64 from a generator seeded by the
stage's seed, the example's index in the stage and the draw's index within the batch, and is cast to the
dtype asked for. Two trials at one seed therefore draw identical targets whatever their dtypes and batch
sizes; a second `sampling_seed` draws an independent set (the `fisher-sampling-noise` measurement).

A draw whose leading dimension is not a multiple of the batch's examples (a scalar, a shape of its own)
is drawn from one generator seeded by the batch's first example. A generator the Task passes itself is
used as given. Random numbers drawn outside `torch`'s functions (numpy, `random`) are not controlled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

FLOAT64 = torch.float64


@dataclass
class Draws:
    """The state of one stage's draws: its seed, the examples already sampled, the draws in this batch."""

    seed: int
    examples_seen: int = 0
    batch_examples: int = 0
    draw_index: int = 0
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def generator(self, device: torch.device, *key: int) -> torch.Generator:
        """A generator on `device`, seeded by the stage's seed and `key` (one per device, reseeded)."""
        name = str(device)
        if name not in self.generators:
            self.generators[name] = torch.Generator(device=device)
        digest = hashlib.sha256(repr((self.seed, *key)).encode()).digest()
        return self.generators[name].manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))

    def chunks(self, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """How a draw of `shape` splits by example: [(key, shape of the part)], in order along dimension 0."""
        index, self.draw_index = self.draw_index, self.draw_index + 1
        examples = self.batch_examples
        if shape and examples and shape[0] % examples == 0 and shape[0] > 0:
            rows = shape[0] // examples
            part = (rows, *shape[1:])
            return [((self.examples_seen + example, index), part) for example in range(examples)]
        return [((-1 - self.examples_seen, index), shape)]

    def standard(self, shape: tuple[int, ...], device: torch.device, kind: str) -> torch.Tensor:
        """A float64 tensor of `shape` of standard normal ("normal") or uniform [0, 1) ("uniform") values."""
        make = ORIGINAL["randn"] if kind == "normal" else ORIGINAL["rand"]
        parts = [
            make(part, dtype=FLOAT64, device=device, generator=self.generator(device, *key))
            for key, part in self.chunks(tuple(shape))
        ]
        return torch.cat(parts) if len(parts) > 1 else parts[0].reshape(shape)

    def per_chunk(self, tensor: torch.Tensor, function: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> Any:
        """`function` applied to each example's rows of `tensor` with that example's generator."""
        chunks = self.chunks(tuple(tensor.shape))
        if len(chunks) == 1:
            return function(tensor, self.generator(tensor.device, *chunks[0][0]))
        rows = chunks[0][1][0]
        parts = [
            function(tensor[n * rows : (n + 1) * rows], self.generator(tensor.device, *key))
            for n, (key, _part) in enumerate(chunks)
        ]
        return torch.cat(parts)


_ACTIVE: Draws | None = None


@contextmanager
def drawing(seed: int, first_example: int = 0) -> Iterator[None]:
    """For the duration of a stage: the Task's sampled targets are drawn from `seed` (see the module), the
    first example the stage sees counted as `first_example` (a slice of the data starts later)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, Draws(seed, examples_seen=first_example)
    try:
        yield
    finally:
        _ACTIVE = previous


@contextmanager
def sampled_batch(examples: int) -> Iterator[None]:
    """Around one `compute_train_loss(sample=True)`: its random functions draw per example from the
    active stage's seed. Outside a stage (`drawing`), nothing changes."""
    draws = _ACTIVE
    if draws is None:
        yield
        return
    draws.batch_examples, draws.draw_index = examples, 0
    originals = _install(draws)
    try:
        yield
    finally:
        _restore(originals)
        draws.examples_seen += examples


def stage_seed(run_seed: int, sampling_seed: int, stage_index: int, rank: int = 0) -> int:
    """The seed of one stage's draws: the run's seed, the sampling seed, the stage and the rank."""
    digest = hashlib.sha256(repr((run_seed, sampling_seed, stage_index, rank)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


# --- the random functions, drawn per example in float64 --------------------------------------------------

ORIGINAL: dict[str, Any] = {
    "randn": torch.randn,
    "rand": torch.rand,
    "multinomial": torch.multinomial,
    "poisson": torch.poisson,
}


def _float_dtype(dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None else torch.get_default_dtype()


def _size(size: tuple[Any, ...]) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size):
        return tuple(int(s) for s in size[0])
    return tuple(int(s) for s in size)


def _replacements(draws: Draws) -> dict[tuple[Any, str], Callable[..., Any]]:
    """(owner, name) → the function that replaces it while a batch is sampled."""

    def factory(kind: str, name: str) -> Callable[..., Any]:
        original = getattr(torch, name)

        def replaced(
            *size: Any, dtype: torch.dtype | None = None, device: Any = None, generator: Any = None, **kw: Any
        ):
            if generator is not None or kw.get("out") is not None or kw.get("names") is not None:
                return original(*size, dtype=dtype, device=device, generator=generator, **kw)
            dtype = _float_dtype(dtype)
            device = torch.device(device) if device is not None else torch.empty(0).device
            values = draws.standard(_size(size), device, kind).to(dtype)
            return values.requires_grad_(bool(kw.get("requires_grad", False)))

        return replaced

    def like(kind: str, name: str) -> Callable[..., Any]:
        original = getattr(torch, name)

        def replaced(tensor: torch.Tensor, *args: Any, dtype: torch.dtype | None = None, **kw: Any) -> torch.Tensor:
            target = dtype if dtype is not None else tensor.dtype
            if args or not target.is_floating_point or kw.get("generator") is not None:
                return original(tensor, *args, dtype=dtype, **kw)
            device = torch.device(kw["device"]) if kw.get("device") is not None else tensor.device
            return draws.standard(tuple(tensor.shape), device, kind).to(target)

        return replaced

    def normal(mean: Any = 0.0, std: Any = 1.0, *args: Any, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is not None or kw.get("out") is not None:
            return ORIGINAL_NORMAL(mean, std, *args, **kw)
        tensors = [value for value in (mean, std) if isinstance(value, torch.Tensor)]
        if not tensors:  # normal(mean, std, size)
            size = args[0] if args else kw["size"]
            dtype = _float_dtype(kw.get("dtype"))
            device = torch.device(kw["device"]) if kw.get("device") is not None else torch.empty(0).device
            return (mean + std * draws.standard(_size((size,)), device, "normal")).to(dtype)
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        dtype, device = tensors[0].dtype, tensors[0].device
        as64 = [value.detach().to(FLOAT64) if isinstance(value, torch.Tensor) else value for value in (mean, std)]
        return (as64[0] + as64[1] * draws.standard(tuple(shape), device, "normal")).to(dtype)

    def bernoulli(tensor: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is not None or kw.get("out") is not None:
            return ORIGINAL_BERNOULLI(tensor, *args, **kw)
        p = args[0] if args else kw.get("p")
        probabilities = tensor.detach().to(FLOAT64) if p is None else torch.full(tensor.shape, float(p), dtype=FLOAT64)
        uniform = draws.standard(tuple(tensor.shape), tensor.device, "uniform")
        return (uniform < probabilities.to(tensor.device)).to(tensor.dtype)

    def multinomial(tensor: torch.Tensor, num_samples: int, replacement: bool = False, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is not None or kw.get("out") is not None:
            return ORIGINAL["multinomial"](tensor, num_samples, replacement, **kw)
        probabilities = tensor.detach().to(FLOAT64)
        if probabilities.ndim == 1:
            return _one_row(probabilities, num_samples, replacement, draws)
        return draws.per_chunk(
            probabilities,
            lambda rows, generator: ORIGINAL["multinomial"](rows, num_samples, replacement, generator=generator),
        )

    def poisson(tensor: torch.Tensor, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is not None:
            return ORIGINAL["poisson"](tensor, **kw)
        rates = tensor.detach().to(FLOAT64)
        return draws.per_chunk(rates, lambda rows, generator: ORIGINAL["poisson"](rows, generator=generator)).to(
            tensor.dtype
        )

    def normal_(self: torch.Tensor, mean: float = 0.0, std: float = 1.0, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is not None:
            return ORIGINAL_METHODS["normal_"](self, mean, std, **kw)
        with torch.no_grad():
            return self.copy_(mean + std * draws.standard(tuple(self.shape), self.device, "normal"))

    def uniform_(self: torch.Tensor, low: float = 0.0, high: float = 1.0, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is not None:
            return ORIGINAL_METHODS["uniform_"](self, low, high, **kw)
        with torch.no_grad():
            return self.copy_(low + (high - low) * draws.standard(tuple(self.shape), self.device, "uniform"))

    def bernoulli_(self: torch.Tensor, p: Any = 0.5, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is not None:
            return ORIGINAL_METHODS["bernoulli_"](self, p, **kw)
        probabilities = p.detach().to(FLOAT64) if isinstance(p, torch.Tensor) else float(p)
        with torch.no_grad():
            return self.copy_(draws.standard(tuple(self.shape), self.device, "uniform") < probabilities)

    def exponential_(self: torch.Tensor, lambd: float = 1.0, **kw: Any) -> torch.Tensor:
        if kw.get("generator") is not None:
            return ORIGINAL_METHODS["exponential_"](self, lambd, **kw)
        uniform = draws.standard(tuple(self.shape), self.device, "uniform")
        with torch.no_grad():
            return self.copy_(-torch.log1p(-uniform) / lambd)

    functions: dict[tuple[Any, str], Callable[..., Any]] = {
        (torch, "randn"): factory("normal", "randn"),
        (torch, "rand"): factory("uniform", "rand"),
        (torch, "randn_like"): like("normal", "randn_like"),
        (torch, "rand_like"): like("uniform", "rand_like"),
        (torch, "normal"): normal,
        (torch, "bernoulli"): bernoulli,
        (torch, "multinomial"): multinomial,
        (torch, "poisson"): poisson,
        (torch.Tensor, "normal_"): normal_,
        (torch.Tensor, "uniform_"): uniform_,
        (torch.Tensor, "bernoulli_"): bernoulli_,
        (torch.Tensor, "exponential_"): exponential_,
        (torch.Tensor, "bernoulli"): bernoulli,
        (torch.Tensor, "multinomial"): multinomial,
    }
    return functions


ORIGINAL_NORMAL = torch.normal
ORIGINAL_BERNOULLI = torch.bernoulli
ORIGINAL_METHODS = {name: getattr(torch.Tensor, name) for name in ("normal_", "uniform_", "bernoulli_", "exponential_")}


def _one_row(probabilities: torch.Tensor, num_samples: int, replacement: bool, draws: Draws) -> torch.Tensor:
    key = draws.chunks(())[0][0]
    generator = draws.generator(probabilities.device, *key)
    return ORIGINAL["multinomial"](probabilities, num_samples, replacement, generator=generator)


def _install(draws: Draws) -> dict[tuple[Any, str], Any]:
    originals: dict[tuple[Any, str], Any] = {}
    for (owner, name), replacement in _replacements(draws).items():
        originals[(owner, name)] = getattr(owner, name)
        setattr(owner, name, replacement)
    return originals


def _restore(originals: dict[tuple[Any, str], Any]) -> None:
    for (owner, name), original in originals.items():
        setattr(owner, name, original)
