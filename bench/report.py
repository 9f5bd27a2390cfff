"""Turning measurements into the goals table and into a summary of a py-spy profile."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Row:
    """One line of the table: a goal (verdict PASS/FAIL/ERROR) or a reference (verdict INFO)."""

    goal: str
    target: str
    measured: str
    verdict: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def median(values: Iterable[float]) -> float:
    v = [x for x in values if x == x]  # drop NaN
    return statistics.median(v) if v else float("nan")


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    v = [x for x in values if x == x]
    if not v:
        return "n/a"
    return f"{fmt.format(median(v))} (min {fmt.format(min(v))}, max {fmt.format(max(v))})"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def table(rows: Sequence[Row]) -> str:
    """A fixed-width table for the terminal."""
    heads = ("goal", "target", "verdict", "measured")
    cols = [[r.goal for r in rows], [r.target for r in rows], [r.verdict for r in rows]]
    widths = [max([len(h), *(len(c) for c in col)]) for h, col in zip(heads, cols, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, [*widths, 0], strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 8)
    for r in rows:
        cells = (r.goal, r.target, r.verdict)
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  " + r.measured
        )
    return "\n".join(lines)


def markdown(rows: Sequence[Row]) -> str:
    out = ["| goal | target | verdict | measured |", "|---|---|---|---|"]
    for r in rows:
        cells = (r.goal, r.target, f"**{r.verdict}**", r.measured)
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


# -- py-spy -------------------------------------------------------------------------------------

#: Frames on every stack (the interpreter's entry, the command line, the loop's runner): left out
#: of the inclusive ranking, where they would all show 100 %.
_ENTRY = ("(<frozen runpy>)", "(proxy/__main__.py)", "(asyncio/runners.py)")
_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return file.removeprefix("/work/main/")


def _label(frame: str) -> tuple[str, str]:
    """``(func (file), module group)`` for a py-spy frame ``func (file:line)``."""
    m = _FRAME.match(frame)
    if not m:
        return frame, "other"
    file = _short(m.group("file"))
    group = file.split("/", 1)[0] if "/" in file else file
    if group.startswith(".") or group.isdigit():
        group = file.split("/")[1] if file.count("/") else file
    return f"{m.group('func')} ({file})", group.removesuffix(".py")


def summarise_profile(path: Path, top: int = 15) -> dict[str, object]:
    """Self and inclusive time per function, and self time per package, from py-spy's raw
    (collapsed stacks) output. Idle samples (the loop waiting in epoll) are not in the file, so
    percentages are shares of the time the proxy was busy."""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    total = 0
    for raw in path.read_text().splitlines():
        m = _LINE.match(raw.strip())
        if not m:
            continue
        count = int(m.group(2))
        frames = [f for f in m.group(1).split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        labels = [_label(f) for f in frames]
        leaf, group = labels[-1]
        self_t[leaf] += count
        groups[group] += count
        for name in {lbl for lbl, _ in labels if not lbl.endswith(_ENTRY)}:
            incl[name] += count

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)] if total else []

    return {
        "samples": total,
        "top_self": pct(self_t),
        "top_inclusive": pct(incl),
        "self_by_package": pct(groups),
    }


def write_results(out: Path, rows: Sequence[Row], results: dict[str, Any]) -> None:
    """``results.json`` and ``results.md`` in ``out``; the table, the profile's top frames and
    the goals not met on stdout."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(rows) + "\n")
    print()
    print(table(rows))
    prof = results.get("profile")
    if isinstance(prof, dict) and prof.get("top_self"):
        print("\nprofile, self time (share of busy samples):")
        for name, pct in prof["top_self"][:10]:
            print(f"  {pct:5.1f} %  {name}")
    print(f"\n{results['seconds']:.0f} s; results in {out / 'results.json'}")
    failed = [r.goal for r in rows if r.verdict in ("FAIL", "ERROR")]
    if failed:
        print(f"goals not met: {'; '.join(failed)}")
