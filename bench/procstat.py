"""CPU time and memory of process trees, read from /proc (Linux only)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is index 0)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads, not its waited-for children)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # stat(5): utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_snapshot(pids: Iterable[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two snapshots by the processes alive at both."""
    return sum(max(0.0, after[pid] - before[pid]) for pid in before if pid in after)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree(root: int) -> list[int]:
    """``root`` and all its descendants alive now."""
    children = _children_map()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat_fields(pid) is None:
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def exe_name(pid: int) -> str:
    """The program name (argv[0]'s basename) and, for Python, the module run with -m."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return "?"
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:
        return "?"
    name = os.path.basename(args[0])
    if "-m" in args[:-1]:
        rest = args[args.index("-m") + 1 :]
        return " ".join([name, "-m", *rest[:2]])
    return name


@dataclass(frozen=True)
class Memory:
    rss: int  # bytes resident
    pss: int  # bytes, shared pages divided among the processes mapping them
    uss: int = 0  # bytes private to the process (Private_Clean + Private_Dirty)

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.rss + other.rss, self.pss + other.pss, self.uss + other.uss)


ZERO = Memory(0, 0, 0)
_ROLLUP_FIELDS = ("Rss:", "Pss:", "Private_Clean:", "Private_Dirty:")


def memory(pid: int) -> Memory:
    """Rss, Pss and Uss of one process from /proc/<pid>/smaps_rollup (0 if it is gone)."""
    values = dict.fromkeys(_ROLLUP_FIELDS, 0)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                parts = line.split()
                if parts and parts[0] in values:
                    values[parts[0]] = int(parts[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return ZERO
    return Memory(
        values["Rss:"], values["Pss:"], values["Private_Clean:"] + values["Private_Dirty:"]
    )


def memory_sum(pids: Iterable[int]) -> Memory:
    total = ZERO
    for pid in pids:
        total = total + memory(pid)
    return total
