"""Running a Pipeline through kronfluence, stage by stage, keeping every artifact for the checks."""

from influence_doctor.runner.run import Configuration, Run, RunOptions, StageRecord
from influence_doctor.runner.stages import create_run, run_influence_stages, run_train_stage

__all__ = ["Configuration", "Run", "RunOptions", "StageRecord", "create_run", "run_influence_stages", "run_train_stage"]
