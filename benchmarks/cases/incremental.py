"""The exact and approximate modes of xai-occlusion's incremental engine, measured by
benchmarks/incremental_occlusion.py, as rows of the bound table."""

from __future__ import annotations

import torch
from harness import Case, Config, Row, log

ORDER = 70


def incremental_case() -> Case:
    """The exact and approximate incremental modes of xai-occlusion, measured by
    benchmarks/incremental_occlusion.py (its own method: the engine at its best chunk size, the
    approximations' rank correlation with exact), as rows of the bound table."""
    cid = "incremental"

    def run(cfg: Config) -> list[Row]:
        try:
            import incremental_occlusion
        except ImportError as exc:
            log(f"    benchmarks/incremental_occlusion.py is not usable here: {exc}")
            return []
        found = incremental_occlusion.run(cfg.quick, threads=torch.get_num_threads(), log=log)
        rows = []
        for r in found:
            for key, label in (
                ("exact", "exact"),
                ("approximate", "approximate"),
                ("adaptive", "approximate + refinement"),
            ):
                rho = "" if key == "exact" else f", rank correlation {r[f'{key}_rho']:.3f}"
                rows.append(
                    Row(
                        "bound",
                        f"incremental/{r['case']}/{key}",
                        f"{r['windows']} windows, incremental {label}{rho}",
                        r[f"{key}_s"],
                        f"{r['windows'] + 1} forwards @ batch {r['bound_batch']}",
                        r["bound_s"],
                        1 / r[f"{key}_ratio"],
                        cpu_ratio=1 / r[f"{key}_cpu_ratio"],
                    )
                )
        return rows

    return Case(cid, run)


def cases(cfg: Config) -> list[Case]:
    return [incremental_case()]
