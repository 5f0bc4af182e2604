"""Training on DeepSpeed: experiment YAML schema, the loop, metrics and evaluation.

Entry points are ``run/train.py`` and ``run/eval.py``; the pieces::

    from hmoe_ds.training.experiment import load_experiment, load_ds_config, effective_ds_config, ExperimentError
    from hmoe_ds.training.metrics import MetricsWriter, TrainAccumulator, routing_scalars
    from hmoe_ds.training.trainer import train
    from hmoe_ds.training.evaluate import evaluate

Submodules are imported on demand so that reading a config never imports DeepSpeed.
"""

from .experiment import Experiment, ExperimentError, RunConfig, load_experiment

__all__ = ["Experiment", "ExperimentError", "RunConfig", "load_experiment"]
