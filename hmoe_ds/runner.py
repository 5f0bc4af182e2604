"""The ``deepspeed`` runner seen from this node: the ranks it will start, and, from a rank, what it was told.

Used on both sides of a launch: ``python -m hmoe_ds.launch`` asks
:func:`runner_world_size` before any worker starts, and rank 0 of a run started
by plain ``deepspeed`` asks :func:`check_runner_world` whether the world it got
is the one the user's ``--hostfile`` meant. The hostfile itself is read by
:func:`hmoe_ds.hostfile.parse_hostfile`; the resource filters
(``--include``/``--exclude``/``--num_nodes``/``--num_gpus``) by DeepSpeed's own
functions, so the count is the runner's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from .errors import LaunchError

__all__ = ["check_runner_world", "explicit_option", "parent_pid", "process_args", "runner_command_line",
           "runner_world_size"]

_MPI_LAUNCHERS = ("openmpi", "mpich")  # DeepSpeed refuses resource filters with these


def explicit_option(tokens: Sequence[str], *flags: str) -> bool:
    """Whether one of ``flags`` was typed in ``tokens`` (``--flag value`` or ``--flag=value``), not defaulted."""
    return any(t == f or t.startswith(f + "=") for t in tokens for f in flags)


def runner_world_size(args: argparse.Namespace, launcher_tokens: Sequence[str]) -> int:
    """Ranks the deepspeed runner will start for these (parsed) runner arguments; :class:`LaunchError` if none."""
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

    from .hostfile import parse_hostfile

    filters = args.include or args.exclude or args.num_nodes != -1 or args.num_gpus != -1
    if (args.include or args.exclude) and (args.num_nodes >= 0 or args.num_gpus >= 0):
        raise LaunchError("--include/--exclude cannot be combined with --num_nodes/--num_gpus; use one or the other")
    if explicit_option(launcher_tokens, "--hostfile", "-H") or os.path.isfile(args.hostfile):
        pool = parse_hostfile(args.hostfile)
        if args.launcher.lower() in _MPI_LAUNCHERS and filters:
            raise LaunchError(f"--launcher {args.launcher} runs every slot of the hostfile: remove --include/--exclude/"
                              "--num_nodes/--num_gpus and list only the wanted hosts and slots in the hostfile")
    else:
        from deepspeed.accelerator import get_accelerator

        pool = {"localhost": get_accelerator().device_count()}
        if args.num_nodes > 1:
            raise LaunchError(f"--num_nodes={args.num_nodes} needs a --hostfile listing that many nodes")
    try:
        active = parse_inclusion_exclusion(pool, args.include, args.exclude)
    except (ValueError, KeyError) as exc:
        raise LaunchError(f"--include/--exclude: {exc}") from None
    active = apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus)
    world = sum(len(slots) for slots in active.values())
    if world < 1:
        raise LaunchError("no ranks left to launch after --include/--exclude/--num_nodes/--num_gpus")
    return world


def parent_pid(pid: int) -> int | None:
    """Parent pid of ``pid`` from ``/proc`` (Linux), or ``None`` if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces or parentheses, so split after the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[1])


def process_args(pid: int) -> list[str]:
    """The argv of ``pid`` from ``/proc`` (empty if it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def runner_command_line() -> list[str] | None:
    """The ``deepspeed`` runner's arguments, read by a rank from ``/proc``; ``None`` when not launched by it.

    A rank's parent is DeepSpeed's per-node launcher and its grandparent the
    runner, whose command line holds what the user typed (``--hostfile`` ...).
    Returns the arguments after the runner script (Linux, single-node runner).
    """
    launcher = os.getppid()
    if "deepspeed.launcher.launch" not in " ".join(process_args(launcher)):
        return None
    runner = parent_pid(launcher)
    args = process_args(runner) if runner else []
    for i, token in enumerate(args):
        if Path(token).name == "deepspeed" or token == "deepspeed.launcher.runner":
            return args[i + 1:]
    return None


def check_runner_world(world: int) -> str | None:
    """Rank 0 under plain ``deepspeed``: the hostfile the user named, and the world size it implies.

    The runner falls back to local resources when ``--hostfile`` names no file
    (one warning line among DeepSpeed's), so a run meant for several nodes
    silently trains on one. Raises :class:`LaunchError` (or a
    :class:`~hmoe_ds.errors.HostfileError`); returns a note when the check
    could not be made (the runner's command line was not readable).
    """
    argv = runner_command_line()
    if argv is None:
        return None
    from deepspeed.launcher.runner import parse_args

    try:
        args = parse_args(argv)
    except SystemExit:
        return "could not read the deepspeed runner's arguments; hostfile not checked"
    launcher_tokens = argv[: len(argv) - len(args.user_args) - 1]
    if not explicit_option(launcher_tokens, "--hostfile", "-H"):
        return None
    expected = runner_world_size(args, launcher_tokens)  # parses the hostfile: missing file, bad line, duplicate host
    if expected != world:
        raise LaunchError(f"--hostfile {args.hostfile} with these options means {expected} ranks, but the runner "
                          f"started {world}; check the hostfile and --include/--exclude (python -m hmoe_ds.launch "
                          "checks all this before any worker starts)")
    return None
