"""The blocking baseline sanity rule: which stored baselines make every ratio against them meaningless.

One rule for the `baseline_sanity` asset check (defs/model_assets.py), `esa materialize`'s BLOCKED lines
(defs/runner.py) and the report's "Blocked models" section (core/reporting/report.py).
"""

from __future__ import annotations

import pandas as pd

# A pretrained LM on natural English sits well inside this token-PPL range; outside it the load, tokenizer
# or text is broken (below 2: repeated/memorised text, DESIGN §5). Random-weight tiny models are exempt.
PLAUSIBLE_TOKEN_PPL = (2.0, 1000.0)


def baseline_problems(baselines: pd.DataFrame, *, random_weights: bool) -> list[str]:
    """Why one model's `baselines` rows (columns dataset, flags, token_ppl) fail the sanity rule; [] = pass.

    A row fails on any sanity flag (";"-joined `flags`, e.g. token PPL < 2) or, for a pretrained model, on a
    token PPL outside PLAUSIBLE_TOKEN_PPL; no rows at all is a failure too.
    """
    low, high = PLAUSIBLE_TOKEN_PPL
    if baselines.empty:
        return ["no baseline rows"]
    problems = []
    for row in baselines.itertuples():
        if isinstance(row.flags, str) and row.flags:
            problems.append(f"{row.dataset}: flags {row.flags}")
        if not random_weights and not low <= row.token_ppl <= high:
            problems.append(f"{row.dataset}: token PPL {row.token_ppl:.3f} outside plausible [{low}, {high}]")
    return problems
