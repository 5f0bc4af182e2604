"""Training on DeepSpeed: experiment YAML schema, the loop, metrics and evaluation.

Entry points are ``run/train.py`` (:func:`hmoe_ds.training.trainer.run_training`) and
``run/eval.py`` (:func:`hmoe_ds.cli.run_evaluation`); the pieces::

    from hmoe_ds.training.experiment import load_experiment, load_ds_config, effective_ds_config
    from hmoe_ds.training.metrics import MetricsWriter, TrainAccumulator, routing_scalars
    from hmoe_ds.training.trainer import plan_run, set_up, train_loop, resume
    from hmoe_ds.training.evaluate import evaluate
    from hmoe_ds.errors import ExperimentError     # every user error (also importable from here)

Modules outside this package do not import it (only the command-line drivers,
:mod:`hmoe_ds.cli` and :mod:`hmoe_ds.launch`, do).

Submodules are imported on demand so that reading a config never imports DeepSpeed.
"""

from .experiment import Experiment, ExperimentError, RunConfig, load_experiment

__all__ = ["Experiment", "ExperimentError", "RunConfig", "load_experiment"]
