"""Multi-stage pipelines from one YAML file: ``posttrain pipeline run FILE.yaml``.

    from posttrain.pipeline import run_pipeline
    outputs = run_pipeline("pipe.yaml", until="dpo", overrides=["seed=1"])
    outputs["dpo"]   # Path of the dpo stage's final/ model

Modules, in the order a run uses them: ``source`` (YAML with the line of every key, overrides,
one-line errors), ``spec`` (the file's shape, ``repeat:`` rounds), ``refs`` (``${sft.output}``),
``kinds`` (what a stage can be), ``plan`` (configs, order, fingerprints), ``record``
(``pipeline.json``, ``stage.json``), ``runner`` (skip / resume / redo, workers), ``workers``
(worker processes). See docs/pipelines.md.
"""

from posttrain.pipeline.kinds import StageKind, register_kind, stage_kinds
from posttrain.pipeline.plan import Plan, Stage, load_plan
from posttrain.pipeline.runner import check_pipeline, plan_steps, run_pipeline
from posttrain.pipeline.source import PipelineError

__all__ = ["PipelineError", "Plan", "Stage", "StageKind", "check_pipeline", "load_plan",
           "plan_steps", "register_kind", "run_pipeline", "stage_kinds"]
