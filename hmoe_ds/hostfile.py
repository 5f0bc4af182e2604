"""Hostfile validation for multi-node launches, before any worker is spawned.

The deepspeed runner reads lines ``<hostname> slots=<n>`` (``#`` comments and
blank lines allowed) with ``deepspeed.launcher.runner.fetch_hostfile``, which
rejects a bad line with a bare traceback on the launching node and accepts
some lines that fail later (``slots=0``). :func:`parse_hostfile` first checks
each line and names the file, the line number and the fix; then it lets
DeepSpeed's own parser read the file, so the hosts and slots it returns are the
ones the runner will use.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import HostfileError  # re-exported: the old import path keeps working

__all__ = ["HostfileError", "parse_hostfile", "world_size_of"]

# What a line may hold: DeepSpeed matches only the ``<host> slots=<n>`` prefix; OpenMPI-style extras after it
# (``max_slots=8``) are allowed, anything else is a typo the runner would misread or refuse.
_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-\[\]]+)\s+slots=(?P<slots>\d+)(?:\s+\S+=\S+)*\s*$")


def _check_lines(path: Path) -> None:
    """Raise :class:`HostfileError` at the first line the runner would refuse or misread, naming it."""
    hosts: set[str] = set()
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise HostfileError(f"{path}:{number}: bad line {raw.strip()!r}; expected '<hostname> slots=<n>', "
                                "e.g. 'worker-1 slots=8'")
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            raise HostfileError(f"{path}:{number}: {host} has slots={slots}; slots must be >= 1")
        if host in hosts:
            raise HostfileError(f"{path}:{number}: host {host!r} is listed twice; list each host once with its "
                                "total slots")
        hosts.add(host)
    if not hosts:
        raise HostfileError(f"hostfile {path} lists no hosts; add lines like 'worker-1 slots=8'")


@contextmanager
def _deepspeed_logger_quiet() -> Iterator[None]:
    """DeepSpeed logs the whole file as an error before raising; the :class:`HostfileError` says it better."""
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """Return ``{host: slots}`` in file order, as the deepspeed runner reads it; raise :class:`HostfileError`."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"hostfile {path} does not exist; create it with lines like 'worker-1 slots=8' "
                            "(see hostfile.example)")
    _check_lines(path)
    from deepspeed.launcher.runner import fetch_hostfile

    try:
        with _deepspeed_logger_quiet():
            pool = fetch_hostfile(str(path))
    except ValueError as exc:  # not reached for a file that passed the line checks; DeepSpeed's word is final
        raise HostfileError(f"{path}: {exc}") from None
    return dict(pool)


def world_size_of(hosts: dict[str, int]) -> int:
    """Ranks a launch over ``hosts`` starts: every slot of every host."""
    return sum(hosts.values())
