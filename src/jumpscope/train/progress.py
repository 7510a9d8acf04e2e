"""Live progress bar and the JSONL training log (one line per SAE per logged step)."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

from tqdm.auto import tqdm


class ProgressReporter:
    def __init__(self, log_path: Path | None, total: int, start: int = 0, enabled: bool = True,
                 truncate_after: int | None = None, sites: dict[str, str] | None = None,
                 dead_window: int | None = None):
        """``sites`` maps SAE names to the site they train on: with several sites, each gets a status
        line under the bar (its SAEs' L0, FVU and dead ranges), so a suite shows every site.
        ``dead_window``: the tokens a latent must go without firing to count as dead, shown with
        the dead fraction (which means little without it)."""
        self.log_path = log_path
        self.dead_suffix = f" (no fire in {_short(dead_window)} tok)" if dead_window else ""
        self.bar = tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
        self.sites = sites or {}
        names = sorted(set(self.sites.values()))
        self.site_lines = {site: tqdm(total=0, position=index + 1, bar_format="{desc}", disable=not enabled,
                                      leave=False) for index, site in enumerate(names)} if len(names) > 1 else {}
        self.last = start
        if log_path is not None and truncate_after is not None and log_path.exists():
            # A resumed run rewrites the steps after its checkpoint: drop what the killed run logged.
            kept = [line for line in log_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= truncate_after]
            log_path.write_text("".join(line + "\n" for line in kept))
        self.handle = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(log_path, "a", encoding="utf-8")

    def report(self, step: int, tokens: int, rows: dict[str, dict[str, Any]]) -> None:
        if self.handle is not None:
            for name, values in rows.items():
                self.handle.write(json.dumps({"step": step, "tokens": tokens, "sae": name, **values}) + "\n")
            self.handle.flush()
        self.bar.update(step - self.last)
        self.last = step
        if rows:
            self.bar.set_postfix_str(self._postfix(rows), refresh=False)
        for site, line in self.site_lines.items():
            own = {name: values for name, values in rows.items() if self.sites.get(name) == site}
            if own:
                line.set_description_str(f"  {site}: {self._postfix(own)}")

    def _postfix(self, rows: dict[str, dict[str, Any]]) -> str:
        def fmt(values: dict[str, Any]) -> str:
            return f"L0 {values['l0']:.1f} FVU {values['fvu']:.3f} dead {values['dead_fraction']:.1%}"

        if len(rows) <= 2:
            return " | ".join(f"{name}: {fmt(v)}" for name, v in rows.items()) + self.dead_suffix
        spans = {key: (min(v[key] for v in rows.values()), max(v[key] for v in rows.values()))
                 for key in ("l0", "fvu", "dead_fraction")}
        return (f"{len(rows)} SAEs: L0 {spans['l0'][0]:.1f}-{spans['l0'][1]:.1f} "
                f"FVU {spans['fvu'][0]:.3f}-{spans['fvu'][1]:.3f} "
                f"dead {spans['dead_fraction'][0]:.1%}-{spans['dead_fraction'][1]:.1%}{self.dead_suffix}")

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        for line in self.site_lines.values():
            line.close()
        self.bar.close()
        if self.handle is not None:
            self.handle.close()


def _short(tokens: int) -> str:
    """1_000_000 -> '1M', 2_500 -> '2.5k'."""
    for size, unit in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if tokens >= size:
            return f"{tokens / size:.3g}{unit}"
    return str(tokens)
