"""What a pipeline resolves to, and its train stage: the model built and trained, the data subsampled,
kronfluence's Analyzer set up, and everything measured about them before any factor is fitted.

`open_session` makes the run's folder; `train` runs the train stage: seeds, builds and trains the model
(the user's loop, with the doctor's sample loss measured before and after it), measures the Task's
contract, prepares the model for kronfluence, checks what kronfluence will see of it (coverage) and
sizes each tracked module's factors (pre-flight). What it measured is one typed record,
`TrainEvidence`, that the train stage's checks read. A train stage that raises is recorded, never a crash;
Ctrl-C marks it interrupted and propagates, so the caller can still write a partial report.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from influence_doctor.checks.coverage import CoverageFacts
from influence_doctor.checks.train import SampleLoss
from influence_doctor.configuration import Configuration
from influence_doctor.environment import resolve_device, seed_everything
from influence_doctor.options import RunOptions
from influence_doctor.pipeline import Pipeline, TrainingMonitor, resolve
from influence_doctor.progress import StageProgress
from influence_doctor.runner.executor import StageResult

LOSS_SAMPLE_EXAMPLES = 256
"""Training examples on which the loss is measured before and after training: enough that one batch's
luck does not decide, few enough to cost two forward passes."""


@dataclass
class TrainEvidence:
    """What the train stage measured, before any factor: the checks of the train stage read this."""

    trained: bool = False
    training_seconds: float | None = None  # the user's own loop
    steps: int = 0
    parameters: int = 0
    parameter_dtypes: list[str] = field(default_factory=list)
    sample_loss: SampleLoss | None = None  # the Task's loss on a fixed sample, before and after training
    sample_loss_error: str | None = None  # why the sample loss could not be measured
    rank_parameter_drift: float | None = None  # under torchrun: how far the ranks' own training drifted apart
    contracts: dict[str, dict[str, Any]] = field(default_factory=dict)  # task form → the Task's contract
    tracked_modules: list[str] = field(default_factory=list)
    coverage: CoverageFacts | None = None
    examples_alone: dict[str, Any] | None = None  # the analysed examples and queries, each alone
    preflight: dict[str, Any] | None = None  # each tracked module's factor sizes and eigendecomposition cost
    frozen_tracked: list[str] = field(default_factory=list)  # tracked modules the training left unchanged
    trained_tracked: list[str] = field(default_factory=list)  # tracked modules the training changed

    def contract(self, task_form: str = "as given") -> dict[str, Any] | None:
        return self.contracts.get(task_form)

    def to_metrics(self, task_form: str, examples: int, queries: int) -> dict[str, Any]:
        """As report.json's train stage lists them."""
        metrics: dict[str, Any] = {}
        if self.trained:
            metrics["training_seconds"] = self.training_seconds
        metrics["trained"] = self.trained
        if self.sample_loss is not None:
            metrics["sample_loss"] = asdict(self.sample_loss)
        elif self.sample_loss_error is not None:
            metrics["sample_loss_error"] = self.sample_loss_error
        if self.rank_parameter_drift is not None:
            metrics["rank_parameter_drift"] = self.rank_parameter_drift
        metrics.update(steps=self.steps, parameters=self.parameters, parameter_dtypes=self.parameter_dtypes)
        if (contract := self.contract(task_form)) is not None:
            metrics["task_contract"] = contract
        if self.coverage is not None:
            metrics["tracked_modules"] = self.tracked_modules
            metrics["coverage"] = self.coverage.to_dict()
            metrics["examples_analysed"] = examples
            metrics["queries_analysed"] = queries
        if self.examples_alone is not None:
            metrics["examples_alone"] = self.examples_alone
        if self.preflight is not None:
            metrics["preflight"] = self.preflight
        if self.frozen_tracked and self.trained_tracked:
            metrics["frozen_tracked"] = {"frozen": self.frozen_tracked, "trained": self.trained_tracked}
        return metrics


@dataclass
class Session:
    """The pipeline as resolved for one diagnosis: model, data, Analyzer, and where everything goes."""

    pipeline: Pipeline
    options: RunOptions
    run_dir: Path
    device: str
    seed: int
    progress: StageProgress
    model: Any = None  # prepared for kronfluence once the train stage is done
    analyzer: Any = None
    train_dataset: Any = None  # every training example
    query_dataset: Any = None
    train_indices: list[int] = field(default_factory=list)  # the rehearsal's examples, in the order analysed
    query_indices: list[int] = field(default_factory=list)
    train_subset: Any = None
    query_subset: Any = None
    monitor: TrainingMonitor = field(default_factory=TrainingMonitor)
    evidence: TrainEvidence = field(default_factory=TrainEvidence)
    train_result: StageResult = field(default_factory=lambda: StageResult("train"))
    private_analysis_dir: Path | None = None  # a rank's own kronfluence folder when kronfluence does not shard
    preflight_blocked: list[str] = field(default_factory=list)  # modules that cannot be factored as configured
    tracked: tuple[str, ...] | None = None  # modules tracked instead of the Task's choice, where that cannot be
    _tasks: dict[tuple[str, tuple[str, ...] | None], Any] = field(default_factory=dict, repr=False)
    _forms: dict[tuple[str, ...], tuple[Any, Any]] = field(
        default_factory=dict, repr=False
    )  # tracked → model, Analyzer

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.pipeline.scores)

    @property
    def analysis_dir(self) -> Path:
        """Where kronfluence writes: inside the run's own folder (under torchrun on the CPU, where each
        rank runs kronfluence whole, ranks other than 0 write to a temporary folder of their own)."""
        return self.private_analysis_dir or self.run_dir / "kronfluence"

    @property
    def train_examples_total(self) -> int:
        return len(self.train_dataset) if self.train_dataset is not None else 0

    @property
    def query_examples_total(self) -> int:
        return len(self.query_dataset) if self.query_dataset is not None else 0

    @property
    def ready(self) -> bool:
        """Whether kronfluence can be called: the train stage completed and the Analyzer exists."""
        return self.analyzer is not None and self.train_subset is not None

    def task_for(self, configuration: Configuration) -> Any:
        """The Task kronfluence is given: the user's, made a sum over examples and naming the tracked
        modules where the configuration says so (one wrapper per form)."""
        form = (configuration.task, configuration.tracked_modules)
        if form not in self._tasks:
            from influence_doctor.runner.contract import wrapped_task

            self._tasks[form] = wrapped_task(
                self.pipeline.task, configuration.summed_task, configuration.tracked_modules
            )
        return self._tasks[form]

    def configuration_to_run(self, asked: Configuration) -> Configuration:
        """The configuration the run starts from: the one asked for, made to track the modules kronfluence can
        where its default tracking cannot wrap them all (a coverage change, in the vocabulary of changes)."""
        from influence_doctor.changes import apply

        return apply(f"track:{','.join(self.tracked)}", asked) if self.tracked else asked

    def prepared_for(self, configuration: Configuration) -> tuple[Any, Any]:
        """The prepared model and kronfluence's Analyzer for the configuration's tracked modules: the run's
        own, or (made once) a copy of the trained model prepared to track exactly those modules."""
        tracked = configuration.tracked_modules
        if tracked is None:
            return self.model, self.analyzer
        if tracked not in self._forms:
            self._forms[tracked] = _prepared_copy(self, self.task_for(configuration))
        return self._forms[tracked]

    def contract(self, configuration: Configuration) -> dict[str, Any] | None:
        """The Task's contract as the configuration hands the Task to kronfluence, measured once per form
        (after `task:sum`, on the prepared, trained model)."""
        form = configuration.task
        if form not in self.evidence.contracts and self.model is not None:
            self.evidence.contracts[form] = _measure_contract(
                self, self.model, self.train_dataset, self.query_dataset, self.task_for(configuration)
            )
        return self.evidence.contract(form)

    def resize_rehearsal(self, examples: int) -> None:
        """Keep the first `examples` of the (permuted) training subsample: the rehearsal's final size. All
        of it is the training set in its own order, as a full run sees it."""
        from torch.utils.data import Subset

        dataset = self.train_dataset
        self.train_indices = list(range(len(dataset))) if examples >= len(dataset) else self.train_indices[:examples]
        self.train_subset = Subset(dataset, self.train_indices)


def open_session(pipeline: Pipeline, options: RunOptions, progress: StageProgress) -> Session:
    """Resolve device and seed and create the run's own folder; nothing of the user's is touched."""
    seed = pipeline.seed if options.seed is None else options.seed
    device = resolve_device(options.device)
    session = Session(
        pipeline=pipeline,
        options=options,
        run_dir=_shared_run_dir(Path(options.out_dir), pipeline.name, options.run_id),
        device=device,
        seed=seed,
        progress=progress,
        private_analysis_dir=_private_analysis_dir(),
    )
    progress.note(f"pipeline {pipeline.name!r} on {device}, seed {seed}, writing to {session.run_dir}")
    return session


def train(session: Session, verdict: Callable[[StageResult], str] | None = None) -> StageResult:
    """The train stage: seed, build and train the model, measure it and the Task, subsample the data and
    set up kronfluence's Analyzer. `verdict` gives the stage's status once its checks ran (for the progress
    line); an exception is recorded in the result."""
    pipeline, evidence, result = session.pipeline, session.evidence, session.train_result
    progress = session.progress
    progress.start("train")
    started = time.perf_counter()
    try:
        seed_everything(session.seed)
        model = resolve(pipeline.model)
        session.train_dataset = resolve(pipeline.train_dataset)
        session.query_dataset = resolve(pipeline.query_dataset)
        model.to(session.device)
        evidence.preflight = _preflight(session, model)  # before the user's training and every other measurement
        session.preflight_blocked = _blocked(evidence.preflight)
        session.tracked = _trackable(session, model)
        evidence.parameters = sum(p.numel() for p in model.parameters())
        evidence.parameter_dtypes = sorted({_dtype_name(p.dtype) for p in model.parameters()})
        if session.preflight_blocked:
            result.reason = (
                f"pre-flight: {', '.join(session.preflight_blocked)} cannot be factored as configured, so the model "
                "was neither trained nor analysed"
            )
        else:
            _train_and_measure(session, model)
        result.status = "ok"
    except KeyboardInterrupt:
        result.status, result.seconds = "interrupted", time.perf_counter() - started
        progress.end("train", result.status, result.seconds)
        raise
    except Exception as exc:  # any failure inside the user's code is data, not a crash
        result.status = "error"
        result.error = {"type": _qualified_name(type(exc)), "message": str(exc).strip()}
    result.seconds = time.perf_counter() - started
    status = verdict(result) if verdict is not None else result.status
    progress.end("train", status, result.seconds, result.error_text or "")
    return result


def _train_and_measure(session: Session, model: Any) -> None:
    """The user's loop, with the doctor's sample loss before and after it; the Task's contract; the model
    prepared for kronfluence, what it will see of it, and every analysed example alone."""
    pipeline, evidence, result = session.pipeline, session.evidence, session.train_result
    if pipeline.train is not None:
        result.calls.append("train")
        sample = _loss_sample(session)
        start = _measure_start(session, model, sample)
        before = _fingerprints(session, model)
        began = time.perf_counter()
        pipeline.train(model, session.train_dataset, session.monitor)
        evidence.training_seconds = time.perf_counter() - began  # the user's own loop
        evidence.trained = True
        after = _fingerprints(session, model)
        evidence.frozen_tracked = [name for name in before if after.get(name) == before[name]]
        evidence.trained_tracked = [name for name in before if after.get(name) != before[name]]
        _measure_end(session, model, sample, start)
    else:
        result.reason = "the pipeline gives no train function: the model is analysed as built"
    evidence.rank_parameter_drift = _synchronise_ranks(model)
    evidence.steps = len(session.monitor.loss)
    evidence.contracts["as given"] = _measure_contract(
        session, model, session.train_dataset, session.query_dataset, pipeline.task
    )
    _prepare_analysis(session, model)
    evidence.examples_alone = _examples_alone(session)


def _fingerprints(session: Session, model: Any) -> dict[str, tuple[float, ...]]:
    """Each module kronfluence will track → the float64 sum and sum of squares of its own parameters: an
    optimizer step changes them, a frozen module keeps them to the bit."""
    import torch

    from influence_doctor.runner.preflight import tracked_modules

    names = set(session.tracked) if session.tracked is not None else None
    prints: dict[str, tuple[float, ...]] = {}
    with torch.no_grad():
        for name, module in tracked_modules(model, session.pipeline.task if names is None else None).items():
            if names is not None and name not in names:
                continue
            values: list[float] = []
            for parameter in module.parameters(recurse=False):
                as64 = parameter.detach().to(torch.float64)
                values += [float(as64.sum()), float((as64 * as64).sum())]
            prints[name] = tuple(values)
    return prints


def _loss_sample(session: Session) -> Any:
    """A fixed, seeded sample of training examples (the same before and after training)."""
    from torch.utils.data import Subset

    indices = subsample(len(session.train_dataset), LOSS_SAMPLE_EXAMPLES, session.seed)
    return Subset(session.train_dataset, indices)


def _batch_losses(session: Session, sample: Any) -> Callable[[Any], Iterator[Any]]:
    """The Task's training loss of each batch of the sample, on its device: batches of at most the
    pipeline's batch size, and at least `SAMPLE_GROUPS` of them (the groups the noise is measured over)."""
    from accelerate.utils import send_to_device
    from torch.utils.data import DataLoader

    from influence_doctor.runner.sample_loss import SAMPLE_GROUPS

    size = max(1, min(session.pipeline.batch_size, len(sample) // SAMPLE_GROUPS))
    pipeline = session.pipeline

    def batch_losses(model: Any) -> Iterator[Any]:
        import torch

        device = torch.device(session.device)
        for batch in DataLoader(sample, batch_size=size, collate_fn=pipeline.collate):
            yield pipeline.task.compute_train_loss(send_to_device(batch, device), model, False)

    return batch_losses


def _measure_start(session: Session, model: Any, sample: Any) -> Any:
    """The sample loss and the evidence on the untrained model (`runner.sample_loss`); the error's first
    line when the Task cannot compute it here (a report on the training, never a reason to stop the run)."""
    from influence_doctor.runner.sample_loss import measure_start

    try:
        return measure_start(model, _batch_losses(session, sample))
    except Exception as exc:
        return f"{type(exc).__name__}: {_first_line(exc)}"


def _measure_end(session: Session, model: Any, sample: Any, start: Any) -> None:
    from influence_doctor.runner.sample_loss import measure_end

    if isinstance(start, str):
        session.evidence.sample_loss_error = start
        return
    try:
        session.evidence.sample_loss = measure_end(start, model, _batch_losses(session, sample), len(sample))
    except Exception as exc:
        session.evidence.sample_loss_error = f"{type(exc).__name__}: {_first_line(exc)}"


def _measure_contract(
    session: Session, model: Any, train_dataset: Any, query_dataset: Any, task: Any
) -> dict[str, Any]:
    """The Task on small batches against their examples alone (seeded examples), without touching the
    random state."""
    import torch
    from torch.utils.data import Subset

    from influence_doctor.runner.contract import CONTRACT_EXAMPLES, measure_contract

    train_part = Subset(train_dataset, subsample(len(train_dataset), CONTRACT_EXAMPLES, session.seed))
    queries = Subset(query_dataset, range(min(CONTRACT_EXAMPLES, len(query_dataset))))
    with torch.random.fork_rng(devices=_cuda_devices(session.device)):
        return measure_contract(task, model, train_part, queries, session.pipeline.collate, session.device)


def _preflight(session: Session, model: Any) -> dict[str, Any]:
    """Each module kronfluence will track: its factor sizes and eigendecomposition cost, from the model as
    built and the configured arguments, before anything else runs."""
    from influence_doctor.runner.memory import device_memory_bytes
    from influence_doctor.runner.preflight import preflight

    budget = session.options.memory_budget or device_memory_bytes(session.device)
    pipeline = session.pipeline
    try:
        return preflight(model, pipeline.factor_args, session.device, int(budget) if budget else None, pipeline.task)
    except Exception as exc:  # a report on sizes, never a reason to stop the run
        return {"error": f"{type(exc).__name__}: {_first_line(exc)}"}


def _blocked(record: dict[str, Any]) -> list[str]:
    """Tracked modules the pre-flight found impossible to factor as configured (memory, the solver's limit),
    or the model itself, when it is one module kronfluence cannot wrap."""
    from influence_doctor.checks.sizes import blocked

    root = ["the model itself"] if "" in (record.get("unsupported") or {}) else []
    return root + (blocked(record) if "modules" in record else [])


def _trackable(session: Session, model: Any) -> tuple[str, ...] | None:
    """Where kronfluence's default tracking cannot wrap some module, the modules it can: the diagnosis
    goes on with them (a coverage change); None where the Task's own choice works."""
    from influence_doctor.runner.preflight import tracked_modules

    if not (session.evidence.preflight or {}).get("unsupported"):
        return None
    return tuple(sorted(tracked_modules(model, session.pipeline.task))) or None


def _examples_alone(session: Session) -> dict[str, Any]:
    """Each analysed training example and query alone, through the prepared model: the non-finite ones."""
    import torch

    from influence_doctor.runner.contract import nonfinite_examples

    task, collate, device = session.pipeline.task, session.pipeline.collate, session.device
    with torch.random.fork_rng(devices=_cuda_devices(device)):
        return {
            "train": nonfinite_examples(
                task, session.model, session.train_subset, session.train_indices, collate, device
            ),
            "query": nonfinite_examples(
                task, session.model, session.query_subset, session.query_indices, collate, device, measurement=True
            ),
        }


def _synchronise_ranks(model: Any) -> float | None:
    """Under torchrun every rank analyses rank 0's trained model: how far the ranks' own training drifted."""
    from influence_doctor.distributed import current, synchronise_parameters

    return synchronise_parameters(model) if current().distributed else None


def _prepare_analysis(session: Session, model: Any) -> None:
    """Subsample, wrap the model for kronfluence and create its Analyzer; on a terminal kronfluence's
    own progress bars show the work inside each long stage."""
    from kronfluence.analyzer import prepare_model
    from torch.utils.data import Subset

    from influence_doctor.runner.contract import wrapped_task

    pipeline, options = session.pipeline, session.options
    session.train_indices = subsample(len(session.train_dataset), options.examples, session.seed)
    session.query_indices = list(range(len(session.query_dataset)))[: options.queries]
    session.train_subset = Subset(session.train_dataset, session.train_indices)
    session.query_subset = Subset(session.query_dataset, session.query_indices)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}  # prepare_model turns them all off
    task = wrapped_task(pipeline.task, tracked=session.tracked)
    session.model = prepare_model(model=model, task=task)
    session.analyzer = _analyzer(session, session.model, task)
    if session.tracked is not None:  # the configuration that names them runs this model, not a copy
        session._forms[session.tracked] = (session.model, session.analyzer)
    session.evidence.tracked_modules = _tracked_module_names(session.model)
    session.evidence.coverage = _coverage(session, trainable)


def _analyzer(session: Session, model: Any, task: Any) -> Any:
    """kronfluence's Analyzer for a prepared model, writing into the run's own folder."""
    from kronfluence.analyzer import Analyzer

    from influence_doctor.runner.calls import quiet_kronfluence

    with quiet_kronfluence():
        analyzer = Analyzer(
            analysis_name=session.pipeline.name,
            model=_wrapped_for_kronfluence(session, model),
            task=task,
            cpu=session.device == "cpu",
            disable_tqdm=not session.progress.interactive,
            log_level=logging.WARNING,
            output_dir=str(session.analysis_dir),
        )
        if session.pipeline.dataloader_kwargs is not None:
            analyzer.set_dataloader_kwargs(session.pipeline.dataloader_kwargs)
    return analyzer


def _prepared_copy(session: Session, task: Any) -> tuple[Any, Any]:
    """A copy of the trained model with kronfluence's wrappers taken off and put back on the modules `task`
    names, and its own Analyzer; the run's model is left as it is."""
    import copy

    from kronfluence.analyzer import prepare_model
    from kronfluence.module.tracked_module import TrackedModule

    model = copy.deepcopy(session.model)
    for name, module in list(model.named_modules()):
        if isinstance(module, TrackedModule):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.original_module)
    model = prepare_model(model=model, task=task)
    return model, _analyzer(session, model, task)


def _wrapped_for_kronfluence(session: Session, model: Any) -> Any:
    """The model as kronfluence's Analyzer should get it. Where kronfluence distributes (torchrun on
    CUDA), its documented order: `prepare_model` first, then DistributedDataParallel, then the Analyzer.
    The session keeps the prepared module itself, whose names the checks and reports use."""
    from influence_doctor.distributed import current, kronfluence_distributes

    world = current()
    if not (world.distributed and kronfluence_distributes()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    model.to(session.device)
    return DistributedDataParallel(model, device_ids=[world.local_rank], output_device=world.local_rank)


def _coverage(session: Session, trainable: set[int]) -> CoverageFacts:
    """What kronfluence will track, and which tracked modules one forward pass of two training examples
    reaches (the pass runs without gradients and leaves the model as it was; if it fails, the reason is
    kept instead of the never-called list)."""
    import torch
    from accelerate.utils import send_to_device
    from kronfluence.module.tracked_module import TrackedModule
    from torch.utils.data import DataLoader, Subset

    from influence_doctor.checks.coverage import coverage_facts

    called: set[str] = set()
    hooks = [
        module.register_forward_hook(lambda *_args, name=name: called.add(name))
        for name, module in session.model.named_modules()
        if isinstance(module, TrackedModule)
    ]
    error = None
    try:
        two = Subset(session.train_subset, range(min(2, len(session.train_subset))))
        batch = next(iter(DataLoader(two, batch_size=2, collate_fn=session.pipeline.collate)))
        with torch.no_grad():
            session.pipeline.task.compute_train_loss(
                send_to_device(batch, torch.device(session.device)), session.model, sample=False
            )
    except Exception as exc:  # coverage is a report, never a reason to stop the run
        error = f"{type(exc).__name__}: {_first_line(exc)}"
    finally:
        for hook in hooks:
            hook.remove()
    return coverage_facts(session.model, None if error else called, error, trainable)


def subsample(total: int, examples: int | str | None, seed: int) -> list[int]:
    """A seeded subsample: the rehearsal sees a fixed, representative slice of the data.

    A given size is sorted; "auto" keeps the whole seeded permutation, so that whatever size the time
    budget later chooses (`Session.resize_rehearsal`) is a prefix of it, and the pilots' examples stay in it.
    """
    import torch

    if examples is None or (isinstance(examples, int) and examples >= total):
        return list(range(total))
    permutation = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return permutation if examples == "auto" else sorted(permutation[:examples])


def _cuda_devices(device: str) -> list[int]:
    import torch

    return [torch.device(device).index or 0] if str(device).startswith("cuda") else []


def _tracked_module_names(model: Any) -> list[str]:
    from kronfluence.module.utils import get_tracked_module_names

    return list(get_tracked_module_names(model))


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _private_analysis_dir() -> Path | None:
    """Under torchrun where kronfluence does not shard (the CPU), every rank runs it whole: ranks other
    than 0 keep their kronfluence files in a temporary folder, removed when the diagnosis ends."""
    import tempfile

    from influence_doctor.distributed import current, kronfluence_distributes

    world = current()
    if not world.distributed or world.is_writer or kronfluence_distributes():
        return None
    return Path(tempfile.mkdtemp(prefix=f"influence-doctor-rank{world.rank}-"))


def _shared_run_dir(out_dir: Path, pipeline_name: str, run_id: str | None) -> Path:
    """The run's folder; under torchrun rank 0 creates it and every rank learns its name."""
    from influence_doctor.distributed import current, decide

    world = current()
    if not world.distributed:
        return _new_run_dir(out_dir, pipeline_name, run_id)
    return decide(_new_run_dir(out_dir, pipeline_name, run_id) if world.is_writer else None)


def _new_run_dir(out_dir: Path, pipeline_name: str, run_id: str | None) -> Path:
    """reports/<pipeline>/<run-id>/, never reusing an existing folder, even when processes race for
    one name (pytest-xdist workers, ranks): the folder is claimed by an exclusive mkdir."""
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", pipeline_name)
    base = run_id or time.strftime("%Y%m%d-%H%M%S")
    (out_dir / safe_name).mkdir(parents=True, exist_ok=True)
    suffix = 1
    while True:
        candidate = out_dir / safe_name / (base if suffix == 1 else f"{base}-{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            suffix += 1
            continue
        return candidate
