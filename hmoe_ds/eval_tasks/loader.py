"""The harness's ``custom_dataset`` for the shipped tasks: a prepared JSON Lines file as a ``test`` split.

lm-evaluation-harness imports this file by path (``!function loader.load`` in
``_hmoe_bigbench_template_yaml``) and calls :func:`load` with the task's
``dataset_kwargs`` and the run's metadata. ``datasets``' packaged ``json``
builder reads the local file, so it works with ``HF_DATASETS_OFFLINE=1``.
"""

from __future__ import annotations

from typing import Any

import datasets

from hmoe_ds.eval_tasks import task_file


def load(bigbench_task: str, **_metadata: Any) -> datasets.DatasetDict:
    """The prepared examples of BIG-bench task ``bigbench_task`` (``query``, ``choices``, ``gold``)."""
    return datasets.load_dataset("json", data_files={"test": str(task_file(bigbench_task))})
