"""Run the pipeline: train, then one kronfluence call per influence stage, recording every outcome.

A stage that raises is recorded (exception type and message) and the stages that depend on it are
marked not-run; the run itself never crashes on a stage's exception. Ctrl-C marks the current stage
interrupted and propagates, so the caller can still write a partial report.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from influence_doctor.distributed import merge_stage
from influence_doctor.environment import resolve_device, seed_everything
from influence_doctor.findings import Finding, worst_severity
from influence_doctor.pipeline import STAGES, Pipeline, resolve
from influence_doctor.progress import StageProgress
from influence_doctor.runner import calls
from influence_doctor.runner.batch_clock import ForwardClock
from influence_doctor.runner.calls import quiet_kronfluence
from influence_doctor.runner.memory import PeakMemory
from influence_doctor.runner.run import Configuration, Run, RunOptions, StageRecord

INFLUENCE_STAGES: tuple[str, ...] = STAGES[1:]


def create_run(pipeline: Pipeline, options: RunOptions, progress: StageProgress | None = None) -> Run:
    """Resolve device and seed and create the run's own folder; nothing of the user's is touched."""
    progress = progress or StageProgress(enabled=options.progress)
    seed = pipeline.seed if options.seed is None else options.seed
    device = resolve_device(options.device)
    run = Run(
        pipeline=pipeline,
        options=options,
        run_dir=_shared_run_dir(Path(options.out_dir), pipeline.name, options.run_id),
        device=device,
        seed=seed,
        configuration=Configuration(factor_args=pipeline.factor_args, score_args=pipeline.score_args),
    )
    run.private_analysis_dir = _private_analysis_dir()
    progress.note(f"pipeline {pipeline.name!r} on {device}, seed {seed}, writing to {run.run_dir}")
    return run


def _private_analysis_dir() -> Path | None:
    """Under torchrun where kronfluence does not shard (the CPU), every rank runs it whole: ranks other
    than 0 keep their kronfluence files in a temporary folder, removed when the diagnosis ends."""
    import tempfile

    from influence_doctor.distributed import current, kronfluence_distributes

    world = current()
    if not world.distributed or world.is_writer or kronfluence_distributes():
        return None
    return Path(tempfile.mkdtemp(prefix=f"influence-doctor-rank{world.rank}-"))


def run_train_stage(
    run: Run,
    progress: StageProgress | None = None,
    on_stage_done: Callable[[StageRecord], None] | None = None,
) -> Run:
    """Seed, build and train the model, subsample the data and set up kronfluence's Analyzer."""
    progress = progress or StageProgress(enabled=run.options.progress)
    pipeline = run.pipeline
    record = run.stages["train"]
    with _stage(run, record, progress):
        seed_everything(run.seed)
        model = resolve(pipeline.model)
        train_dataset = resolve(pipeline.train_dataset)
        query_dataset = resolve(pipeline.query_dataset)
        model.to(run.device)
        if pipeline.train is not None:
            record.calls.append("train")
            sample = _loss_sample(run, train_dataset)
            start = _measure_start(run, model, sample)
            started = time.perf_counter()
            pipeline.train(model, train_dataset, run.monitor)
            record.metrics["training_seconds"] = time.perf_counter() - started  # the user's own loop
            record.metrics["trained"] = True
            _record_sample_loss(record, run, model, sample, start)
        else:
            record.metrics["trained"] = False
            record.reason = "the pipeline gives no train function: the model is analysed as built"
        _synchronise_ranks(record, model)
        record.metrics["steps"] = len(run.monitor.loss)
        record.metrics["parameters"] = sum(p.numel() for p in model.parameters())
        record.metrics["parameter_dtypes"] = sorted({_dtype_name(p.dtype) for p in model.parameters()})
        record.metrics["task_contract"] = _measure_contract(run, model, train_dataset, query_dataset)
        _prepare_analysis(run, model, train_dataset, query_dataset, show_bars=progress.interactive)
        record.metrics["examples_alone"] = _examples_alone(run)
        record.metrics["preflight"] = _preflight(run)
        if on_stage_done is not None:
            on_stage_done(record)
    return run


LOSS_SAMPLE_EXAMPLES = 256
"""Training examples on which the loss is measured before and after training: enough that one batch's
luck does not decide, few enough to cost two forward passes."""


def _loss_sample(run: Run, train_dataset: Any) -> Any:
    """A fixed, seeded sample of training examples (the same before and after training)."""
    from torch.utils.data import Subset

    indices = _subsample(len(train_dataset), LOSS_SAMPLE_EXAMPLES, run.seed)
    return Subset(train_dataset, indices)


def _batch_losses(run: Run, sample: Any) -> Callable[[Any], Iterator[Any]]:
    """The Task's training loss of each batch of the sample, at the run's train batch size, on its device."""
    from accelerate.utils import send_to_device
    from torch.utils.data import DataLoader

    size = max(1, min(run.train_batch_size, len(sample)))

    def batch_losses(model: Any) -> Iterator[Any]:
        import torch

        device = torch.device(run.device)
        for batch in DataLoader(sample, batch_size=size, collate_fn=run.pipeline.collate):
            yield run.pipeline.task.compute_train_loss(send_to_device(batch, device), model, False)

    return batch_losses


def _measure_start(run: Run, model: Any, sample: Any) -> Any:
    """The sample loss and the evidence on the untrained model (`runner.sample_loss`); the error's first
    line when the Task cannot compute it here (a report on the training, never a reason to stop the run)."""
    from influence_doctor.runner.sample_loss import measure_start

    try:
        return measure_start(model, _batch_losses(run, sample))
    except Exception as exc:
        return f"{type(exc).__name__}: {_first_line(exc)}"


def _record_sample_loss(record: StageRecord, run: Run, model: Any, sample: Any, start: Any) -> None:
    from dataclasses import asdict

    from influence_doctor.runner.sample_loss import measure_end

    if isinstance(start, str):
        record.metrics["sample_loss_error"] = start
        return
    try:
        measured = measure_end(start, model, _batch_losses(run, sample), len(sample))
    except Exception as exc:
        record.metrics["sample_loss_error"] = f"{type(exc).__name__}: {_first_line(exc)}"
        return
    record.metrics["sample_loss"] = asdict(measured)


def _measure_contract(run: Run, model: Any, train_dataset: Any, query_dataset: Any, task: Any = None) -> dict[str, Any]:
    """The Task on small batches against their examples alone (seeded examples), without touching the
    random state."""
    import torch
    from torch.utils.data import Subset

    from influence_doctor.runner.contract import CONTRACT_EXAMPLES, measure_contract

    train = Subset(train_dataset, _subsample(len(train_dataset), CONTRACT_EXAMPLES, run.seed))
    queries = Subset(query_dataset, range(min(CONTRACT_EXAMPLES, len(query_dataset))))
    devices = [torch.device(run.device).index or 0] if str(run.device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        task = task if task is not None else run.pipeline.task
        return measure_contract(task, model, train, queries, run.pipeline.collate, run.device)


def measure_contract_of(run: Run, summed: bool) -> dict[str, Any]:
    """The contract measured again on the trained model, with the Task as given or made a sum."""
    from influence_doctor.runner.contract import summed_task

    task = summed_task(run.pipeline.task) if summed else run.pipeline.task
    return _measure_contract(run, run.model, run.train_subset.dataset, run.query_subset.dataset, task)


def _preflight(run: Run) -> dict[str, Any]:
    """Each tracked module's factor sizes and eigendecomposition cost, before anything is fitted."""
    from influence_doctor.projection.preflight import preflight
    from influence_doctor.runner.memory import device_memory_bytes

    budget = run.options.memory_budget or device_memory_bytes(run.device)
    try:
        return preflight(run.model, run.factor_args, run.device, int(budget) if budget else None)
    except Exception as exc:  # a report on sizes, never a reason to stop the run
        return {"error": f"{type(exc).__name__}: {_first_line(exc)}"}


def preflight_blocked(run: Run) -> list[str]:
    """Tracked modules the pre-flight found too large to factor within the memory budget."""
    from influence_doctor.checks.sizes import over_budget

    record = run.stages["train"].metrics.get("preflight") or {}
    return over_budget(record) if "modules" in record else []


def _examples_alone(run: Run) -> dict[str, Any]:
    """Each analysed training example and query alone, through the prepared model: the non-finite ones."""
    import torch

    from influence_doctor.runner.contract import nonfinite_examples

    task, collate, device = run.pipeline.task, run.pipeline.collate, run.device
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        return {
            "train": nonfinite_examples(task, run.model, run.train_subset, run.train_indices, collate, device),
            "query": nonfinite_examples(
                task, run.model, run.query_subset, run.query_indices, collate, device, measurement=True
            ),
        }


def _synchronise_ranks(record: StageRecord, model: Any) -> None:
    """Under torchrun every rank analyses rank 0's trained model; ranks that trained apart are a warning."""
    from influence_doctor.distributed import current, synchronise_parameters

    if not current().distributed:
        return
    drift = synchronise_parameters(model)
    record.metrics["rank_parameter_drift"] = drift
    if drift > 0:
        record.findings.append(
            Finding(
                check="train.ranks_agree",
                stage="train",
                subject="",
                severity="warn",
                value=drift,
                limit=0.0,
                cause=None,
                message=f"The ranks trained different models (largest parameter difference {drift:.3g}): seed "
                "every rank alike; every rank now analyses rank 0's model.",
            )
        )


def _prepare_analysis(run: Run, model: Any, train_dataset: Any, query_dataset: Any, show_bars: bool) -> None:
    """Subsample, wrap the model for kronfluence and create its Analyzer; on a terminal kronfluence's
    own progress bars show the work inside each long stage."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from torch.utils.data import Subset

    run.train_examples_total = len(train_dataset)
    run.query_examples_total = len(query_dataset)
    run.train_indices = _subsample(len(train_dataset), run.options.examples, run.seed)
    run.query_indices = list(range(len(query_dataset)))[: run.options.queries]
    run.train_subset = Subset(train_dataset, run.train_indices)
    run.query_subset = Subset(query_dataset, run.query_indices)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}  # prepare_model turns them all off
    run.model = prepare_model(model=model, task=run.pipeline.task)
    with quiet_kronfluence():
        run.analyzer = Analyzer(
            analysis_name=run.pipeline.name,
            model=_wrapped_for_kronfluence(run),
            task=run.pipeline.task,
            cpu=run.device == "cpu",
            disable_tqdm=not show_bars,
            log_level=logging.WARNING,
            output_dir=str(run.analysis_dir),
        )
        if run.pipeline.dataloader_kwargs is not None:
            run.analyzer.set_dataloader_kwargs(run.pipeline.dataloader_kwargs)
    run.stages["train"].metrics["tracked_modules"] = _tracked_module_names(run.model)
    run.stages["train"].metrics["coverage"] = _coverage(run, trainable).to_dict()
    run.stages["train"].metrics["examples_analysed"] = len(run.train_indices)
    run.stages["train"].metrics["queries_analysed"] = len(run.query_indices)


def _wrapped_for_kronfluence(run: Run) -> Any:
    """The model as kronfluence's Analyzer should get it. Where kronfluence distributes (torchrun on
    CUDA), its documented order: `prepare_model` first, then DistributedDataParallel, then the Analyzer.
    `run.model` stays the prepared module itself, whose names the checks and reports use."""
    from influence_doctor.distributed import current, kronfluence_distributes

    world = current()
    if not (world.distributed and kronfluence_distributes()):
        return run.model
    from torch.nn.parallel import DistributedDataParallel

    run.model.to(run.device)
    return DistributedDataParallel(run.model, device_ids=[world.local_rank], output_device=world.local_rank)


def _coverage(run: Run, trainable: set[int]) -> Any:
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
        for name, module in run.model.named_modules()
        if isinstance(module, TrackedModule)
    ]
    error = None
    try:
        two = Subset(run.train_subset, range(min(2, len(run.train_subset))))
        batch = next(iter(DataLoader(two, batch_size=2, collate_fn=run.pipeline.collate)))
        with torch.no_grad():
            run.pipeline.task.compute_train_loss(
                send_to_device(batch, torch.device(run.device)), run.model, sample=False
            )
    except Exception as exc:  # coverage is a report, never a reason to stop the run
        error = f"{type(exc).__name__}: {_first_line(exc)}"
    finally:
        for hook in hooks:
            hook.remove()
    return coverage_facts(run.model, None if error else called, error, trainable)


def _subsample(total: int, examples: int | str | None, seed: int) -> list[int]:
    """A seeded subsample: the rehearsal sees a fixed, representative slice of the data.

    A given size is sorted; "auto" keeps the whole seeded permutation, so that whatever size the time
    budget later chooses (`resize_rehearsal`) is a prefix of it, and the pilots' examples stay in it.
    """
    import torch

    if examples is None or (isinstance(examples, int) and examples >= total):
        return list(range(total))
    permutation = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return permutation if examples == "auto" else sorted(permutation[:examples])


def resize_rehearsal(run: Run, examples: int) -> None:
    """Keep the first `examples` of the run's (permuted) training subsample: the rehearsal's final size.
    All of it is the training set in its own order, as a full run sees it."""
    from torch.utils.data import Subset

    dataset = run.train_subset.dataset
    run.train_indices = list(range(len(dataset))) if examples >= len(dataset) else run.train_indices[:examples]
    run.train_subset = Subset(dataset, run.train_indices)
    run.stages["train"].metrics["examples_analysed"] = len(run.train_indices)


def run_influence_stages(
    run: Run,
    progress: StageProgress | None = None,
    *,
    first_stage: str = "covariance",
    factors_name: str | None = None,
    load_covariance_from: str | None = None,
    on_stage_done: Callable[[StageRecord], None] | None = None,
) -> Run:
    """Run the influence stages from `first_stage` on, with `run.factor_args` / `run.score_args`.

    `load_covariance_from` names another factors folder whose covariances the eigendecomposition
    should start from (kronfluence's `load_from_factors_name`), for doctored covariances.
    `on_stage_done` is called as each stage finishes, before its verdict is settled, so the checks
    run while artifacts are fresh and their findings decide the stage's status.
    """
    from kronfluence.factor.config import FactorConfig

    progress = progress or StageProgress(enabled=run.options.progress)
    if first_stage not in INFLUENCE_STAGES:
        raise ValueError(f"first_stage must be one of {INFLUENCE_STAGES}, not {first_stage!r}")
    if factors_name is not None:
        run.factors_name = factors_name
    strategy = FactorConfig.CONFIGS[run.factor_args.strategy]
    needed = {
        "covariance": strategy.requires_covariance_matrices,
        "eigendecomposition": strategy.requires_eigendecomposition,
        "lambda": strategy.requires_lambda_matrices,
        "pairwise_scores": "pairwise" in run.pipeline.scores,
        "self_scores": "self" in run.pipeline.scores,
    }
    reasons = {
        "pairwise_scores": "the pipeline does not ask for pairwise scores",
        "self_scores": "the pipeline does not ask for self scores",
    }
    start = INFLUENCE_STAGES.index(first_stage)
    blocked = preflight_blocked(run)
    for index, name in enumerate(INFLUENCE_STAGES):
        if index < start:
            continue
        record = run.stages[name] = StageRecord(name)
        run.artifacts.pop(name, None)  # never let a stale result stand in for a stage that re-runs
        record.configured_dtypes = _configured_dtypes(run, name)
        if blocked:
            record.reason = f"pre-flight: {', '.join(blocked)} cannot be factored within the memory budget"
            progress.end(name, "not-run", detail=record.reason)
            continue
        if not needed[name]:
            record.status = "skipped"
            record.reason = reasons.get(name, f"strategy {run.factor_args.strategy!r} does not need it")
            if name == "covariance":
                # Still let kronfluence record the factor arguments the score stages will read.
                _CALLS[name](run, None)
            progress.end(name, record.status, detail=record.reason)
            continue
        blocker = _blocking_stage(run, name)
        if blocker is not None:
            record.reason = f"stage {blocker!r} did not complete"
            progress.end(name, "not-run", detail=record.reason)
            continue
        with _stage(run, record, progress):
            seed_everything(run.seed + STAGES.index(name))
            record.calls.append(calls.CALL_NAMES[name])
            started = time.perf_counter()
            with (
                quiet_kronfluence(),
                calls.task_in_force(run.analyzer, run.task),
                PeakMemory(run.device) as peak,
                ForwardClock(run.model) as clock,
            ):
                _CALLS[name](run, load_covariance_from)
            record.seconds = time.perf_counter() - started
            record.metrics["memory"] = peak.to_dict()
            record.forward_stamps = clock.stamps
            record.metrics["forward_calls"] = len(clock.stamps)
            run.artifacts[name] = _load(run, name)
            record.metrics.update(_artifact_metrics(name, run.artifacts[name]))
            if on_stage_done is not None:
                on_stage_done(record)
    return run


def _blocking_stage(run: Run, name: str) -> str | None:
    """The earliest stage this one depends on that did not complete, or None."""
    prerequisites = ["train", "covariance", "eigendecomposition", "lambda"]
    for earlier in prerequisites[: STAGES.index(name)]:
        status = run.stages[earlier].status
        if status not in ("ok", "warn", "fail", "skipped"):
            return earlier
    return None


@contextmanager
def _stage(run: Run, record: StageRecord, progress: StageProgress) -> Iterator[None]:
    """Time the stage, turn an exception into a recorded error, and mark Ctrl-C as interrupted."""
    progress.start(record.name)
    started = time.perf_counter()
    try:
        yield
    except KeyboardInterrupt:
        record.status = "interrupted"
        record.seconds = time.perf_counter() - started
        run.interrupted_in = record.name
        progress.end(record.name, record.status, record.seconds)
        raise
    except Exception as exc:  # any failure inside the user's or kronfluence's code is data, not a crash
        record.status = "error"
        record.seconds = time.perf_counter() - started
        record.error = {"type": _qualified_name(type(exc)), "message": str(exc).strip()}
        record.findings.append(
            Finding(
                check=f"{record.name}.raised",
                stage=record.name,
                subject="",
                severity="fail",
                value=None,
                limit=None,
                cause=None,
                message=f"The {record.name} stage raised {type(exc).__name__}: {_first_line(exc)}",
            )
        )
        merge_stage(record)
        progress.end(record.name, record.status, record.seconds, f"{type(exc).__name__}: {_first_line(exc)}")
        return
    if record.status == "not-run":
        record.status = "ok"
    merge_stage(record)  # under torchrun: every rank's findings, the same on every rank
    if record.status == "ok":
        settle_status(record)
    if record.seconds is None:
        record.seconds = time.perf_counter() - started
    progress.end(record.name, record.status, record.seconds)


def settle_status(record: StageRecord) -> None:
    """A completed stage's status is the worst severity among its findings (ok, warn or fail)."""
    if record.completed:
        record.status = {"fail": "fail", "warn": "warn"}.get(worst_severity(record.findings) or "", "ok")


def _fit_covariance(run: Run, _load_from: str | None) -> None:
    calls.fit_covariance(run.analyzer, run.factors_name, run.train_subset, run.train_batch_size, run.factor_args)


def _eigendecompose(run: Run, load_covariance_from: str | None) -> None:
    calls.eigendecompose(run.analyzer, run.factors_name, run.factor_args, load_covariance_from)


def _fit_lambda(run: Run, _load_from: str | None) -> None:
    calls.fit_lambda(run.analyzer, run.factors_name, run.train_subset, run.train_batch_size, run.factor_args)


def _pairwise(run: Run, _load_from: str | None) -> None:
    calls.pairwise_scores(
        run.analyzer,
        run.scores_name("pairwise"),
        run.factors_name,
        run.query_subset,
        run.train_subset,
        run.pipeline.query_batch_size,
        run.train_batch_size,
        run.score_args,
    )


def _self(run: Run, _load_from: str | None) -> None:
    calls.self_scores(
        run.analyzer, run.scores_name("self"), run.factors_name, run.train_subset, run.train_batch_size, run.score_args
    )


_CALLS: dict[str, Callable[[Run, str | None], None]] = {
    "covariance": _fit_covariance,
    "eigendecomposition": _eigendecompose,
    "lambda": _fit_lambda,
    "pairwise_scores": _pairwise,
    "self_scores": _self,
}


def _load(run: Run, stage: str) -> Any:
    kind = {"pairwise_scores": "pairwise", "self_scores": "self"}.get(stage)
    return calls.load(run.analyzer, stage, run.scores_name(kind) if kind else run.factors_name)


def _configured_dtypes(run: Run, stage: str) -> dict[str, str | None]:
    """The precision settings that govern each stage, as configured (not as observed)."""
    fa, sa = run.factor_args, run.score_args
    fields = {
        "covariance": (fa, ("amp_dtype", "activation_covariance_dtype", "gradient_covariance_dtype")),
        "eigendecomposition": (fa, ("eigendecomposition_dtype",)),
        "lambda": (fa, ("amp_dtype", "per_sample_gradient_dtype", "lambda_dtype")),
        "pairwise_scores": (
            sa,
            ("amp_dtype", "per_sample_gradient_dtype", "precondition_dtype", "score_dtype"),
        ),
        "self_scores": (sa, ("amp_dtype", "per_sample_gradient_dtype", "precondition_dtype", "score_dtype")),
    }[stage]
    args, names = fields
    return {name: _dtype_name(getattr(args, name)) for name in names}


def _artifact_metrics(stage: str, artifact: Any) -> dict[str, Any]:
    """Shapes and stored dtypes of what kronfluence wrote: {factor: {module: {shape, dtype}}}."""
    if artifact is None:
        return {}
    stored: dict[str, dict[str, Any]] = {}
    for factor, per_module in artifact.items():
        stored[factor] = (
            {
                module: {"shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
                for module, tensor in per_module.items()
            }
            if isinstance(per_module, dict)
            else {"shape": list(per_module.shape), "dtype": _dtype_name(per_module.dtype)}
        )
    return {"stored": stored}


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
