"""Hostfile parsing: good files, and each bad line named with its line number."""

from __future__ import annotations

import pytest

from hmoe_ds.hostfile import HostfileError, parse_hostfile, world_size_of


def test_parses_hosts_comments_and_blank_lines(tmp_path):
    f = tmp_path / "hostfile"
    f.write_text("# cluster\nworker-1 slots=8\n\nworker-2 slots=4  # half node\n10.0.0.3 slots=2\n")
    hosts = parse_hostfile(f)
    assert hosts == {"worker-1": 8, "worker-2": 4, "10.0.0.3": 2}
    assert world_size_of(hosts) == 14


def test_shipped_example_is_valid():
    from pathlib import Path

    hosts = parse_hostfile(Path(__file__).parent.parent / "hostfile.example")
    assert world_size_of(hosts) >= 2


@pytest.mark.parametrize(
    "text, match",
    [
        ("worker-1 slots=8\nworker-2 8\n", r"hostfile:2: bad line 'worker-2 8'; expected '<hostname> slots=<n>'"),
        ("worker-1 slots=0\n", r"hostfile:1: worker-1 has slots=0; slots must be >= 1"),
        ("worker-1 slots=2\nworker-1 slots=2\n", r"hostfile:2: host 'worker-1' is listed twice"),
        ("# nothing\n\n", "lists no hosts"),
        ("worker-1 slots=two\n", r"hostfile:1: bad line"),
    ],
)
def test_bad_lines_are_named(tmp_path, text, match):
    f = tmp_path / "hostfile"
    f.write_text(text)
    with pytest.raises(HostfileError, match=match):
        parse_hostfile(f)


def test_missing_hostfile(tmp_path):
    with pytest.raises(HostfileError, match="does not exist.*hostfile.example"):
        parse_hostfile(tmp_path / "nope")


def test_openmpi_style_extras_after_slots_are_accepted(tmp_path):
    """DeepSpeed reads only '<host> slots=<n>' at the start of a line; OpenMPI hostfiles add max_slots=."""
    f = tmp_path / "hostfile"
    f.write_text("worker-1 slots=8 max_slots=8\nworker-2 slots=4\n")
    assert parse_hostfile(f) == {"worker-1": 8, "worker-2": 4}


def test_the_hosts_are_deepspeeds_own_reading(tmp_path, monkeypatch):
    """The lines are checked here; the hosts and slots come from the runner's parser (fetch_hostfile)."""
    import deepspeed.launcher.runner as runner

    f = tmp_path / "hostfile"
    f.write_text("worker-1 slots=8\nworker-2 slots=4\n")
    read = []
    original = runner.fetch_hostfile

    def spy(path):
        read.append(path)
        return original(path)

    monkeypatch.setattr(runner, "fetch_hostfile", spy)
    assert list(parse_hostfile(f).items()) == [("worker-1", 8), ("worker-2", 4)]
    assert read == [str(f)]
