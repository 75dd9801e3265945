"""The summary of a search: every trial's state, value, settings, steps, time and adapter, and
the best complete trial, written as OUTPUT/summary.md and summary.json (each replaced whole)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peftloop.search_space import Space


def summary(study, space: Space) -> dict[str, Any]:
    """Every trial (state, value, settings, steps, seconds, adapter) and the best complete one."""
    trials = study.get_trials(deepcopy=False)
    rerun_as = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    rows = []
    for t in trials:
        state = t.state.name.lower()
        if t.number in rerun_as:
            state = f"interrupted, re-run as {rerun_as[t.number]}"
        elif "error" in t.user_attrs:
            state = f"failed: {t.user_attrs['error']}"
        steps = t.user_attrs.get("steps", max(t.intermediate_values, default=None))
        # a trial trained in a group (--parallel) records its own seconds: its group ended later
        seconds = t.user_attrs.get("seconds", t.duration.total_seconds() if t.duration is not None else None)
        rows.append({"trial": t.number, "state": state, "value": t.value, "steps": steps,
                     "seconds": None if seconds is None else round(seconds, 1),
                     "params": {p.name: p.value_of(t.params[p.name])
                                for p in space.params if p.name in t.params},
                     "adapter": t.user_attrs.get("adapter")})
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = study.best_trial.number if complete else None
    return {"metric": space.metric, "direction": space.direction, "best": best,
            "best_trial": next((r for r in rows if r["trial"] == best), None), "trials": rows}


def summary_markdown(table: dict[str, Any]) -> str:
    names = list(dict.fromkeys(k for r in table["trials"] for k in r["params"]))
    lines = [f"# Search: {table['metric']} ({table['direction']})", ""]
    best = table["best_trial"]
    lines += [f"Best: trial {best['trial']}, {table['metric']} {best['value']:.4f}, "
              f"adapter `{best['adapter']}`" if best else "Best: none yet (no trial has completed)", ""]
    header = ["trial", "state", table["metric"], "steps", "seconds", *names, "adapter"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table["trials"]:
        cells = [f"**{r['trial']}**" if r["trial"] == table["best"] else str(r["trial"]), r["state"],
                 "" if r["value"] is None else f"{r['value']:.4f}", _cell(r["steps"]), _cell(r["seconds"]),
                 *[_cell(r["params"].get(n)) for n in names], f"`{r['adapter']}`" if r["adapter"] else ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(value)
    return str(value)


def write_summary(study, space: Space, output_dir: Path) -> dict[str, Any]:
    """OUTPUT/summary.md and summary.json, each replaced whole (a kill never leaves half of one)."""
    table = summary(study, space)
    for name, text in (("summary.json", json.dumps(table, indent=2) + "\n"),
                       ("summary.md", summary_markdown(table))):
        tmp = output_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, output_dir / name)
    return table
