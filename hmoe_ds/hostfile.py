"""Hostfile validation for multi-node launches, before any worker is spawned.

The deepspeed runner reads lines ``<hostname> slots=<n>`` (``#`` comments and
blank lines allowed). It rejects a bad line with a bare traceback on the
launching node; :func:`parse_hostfile` gives the same verdict with the file,
the line number and the fix, so ``hmoe_ds.launch`` can stop early.
"""

from __future__ import annotations

import re
from pathlib import Path

# DeepSpeed matches only this prefix; OpenMPI-style extras after it (``max_slots=8``) are allowed.
_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-\[\]]+)\s+slots=(?P<slots>\d+)(?:\s+\S+=\S+)*\s*$")


class HostfileError(ValueError):
    """A hostfile that the deepspeed runner would refuse, with where and why."""


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """Return ``{host: slots}`` in file order; raise :class:`HostfileError` naming the bad line."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"hostfile {path} does not exist; create it with lines like 'worker-1 slots=8' "
                            "(see hostfile.example)")
    hosts: dict[str, int] = {}
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
        hosts[host] = slots
    if not hosts:
        raise HostfileError(f"hostfile {path} lists no hosts; add lines like 'worker-1 slots=8'")
    return hosts


def world_size_of(hosts: dict[str, int]) -> int:
    return sum(hosts.values())
