"""One home for user errors: every old import path names the same class, and the hierarchy is unchanged."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest

from hmoe_ds import errors


@pytest.mark.parametrize(
    "module, name",
    [
        ("hmoe_ds.training", "ExperimentError"),
        ("hmoe_ds.training.experiment", "ExperimentError"),
        ("hmoe_ds.checkpoint", "CheckpointError"),
        ("hmoe_ds.checkpoint.layout", "CheckpointError"),
        ("hmoe_ds.training.guard", "NonFiniteError"),
        ("hmoe_ds.training.rundir_lock", "RunDirLocked"),
        ("hmoe_ds.hostfile", "HostfileError"),
        ("hmoe_ds.launch", "LaunchError"),
    ],
)
def test_old_import_paths_name_the_same_class(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_the_hierarchy_is_unchanged() -> None:
    """Subclasses of ExperimentError print as one line and travel between ranks; the launch errors are ValueErrors."""
    for cls in (errors.CheckpointError, errors.NonFiniteError, errors.RunDirLocked):
        assert issubclass(cls, errors.ExperimentError)
    for cls in (errors.HostfileError, errors.LaunchError):
        assert issubclass(cls, ValueError) and not issubclass(cls, errors.ExperimentError)


def test_has_checkpoint_dirs_is_a_deprecated_alias_of_checkpoint_dir_names(tmp_path: Path) -> None:
    from hmoe_ds.checkpoint import checkpoint_dir_names, has_checkpoint_dirs

    for name in ("step_10", "step_5", ".partial"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("step_10")
    assert checkpoint_dir_names(tmp_path) == ["step_10", "step_5"]
    with pytest.warns(DeprecationWarning, match="checkpoint_dir_names"):
        assert has_checkpoint_dirs(tmp_path) == ["step_10", "step_5"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint_dir_names(tmp_path)  # the new name does not warn
