"""How normalization statistics compose when signatures are applied (no torch import).

A signature stores BatchNorm `running_mean`/`running_var` as *target* entries: the robust
model's statistics, not a direction. `rwsfmt.patching` weights them by one of these rules;
the command line lists them as `rwsfmt apply --stats`.
"""

from __future__ import annotations

import enum

from .errors import RwsError


class StatsRule(enum.Enum):
    """How the target entries of several signatures (normalization statistics) compose.

    With alphas `alpha_i` on the signatures holding a target for a tensor, the patched value
    is `std + sum_i w_i * (target_i - std)` with

    - `SUM`: `w_i = alpha_i`. Several signatures, or an alpha above 1, move the statistics
      past every target (a running variance can even turn negative).
    - `CONVEX`: `w_i = a_i / max(1, sum_j a_j)`, `a_i = max(alpha_i, 0)`: a convex
      combination of std's and the targets' statistics, so every element stays between
      their smallest and largest value. Equals `SUM` when the alphas are >= 0 and sum to
      at most 1 (one signature at alpha <= 1 included).
    - `KEEP`: `w_i = 0`: std's statistics are left as they are; deltas still apply.

    Delta entries always compose as `std + sum_i alpha_i * RWS_i`, whatever the rule.
    """

    SUM = "sum"
    CONVEX = "convex"
    KEEP = "keep"

    @classmethod
    def parse(cls, value: StatsRule | str) -> StatsRule:
        """`value` as a rule: a `StatsRule` or its name ('sum', 'convex', 'keep')."""
        if isinstance(value, StatsRule):
            return value
        try:
            return cls(value.lower() if isinstance(value, str) else value)
        except ValueError:
            choices = ", ".join(repr(r.value) for r in cls)
            raise RwsError(
                f"unknown rule for normalization statistics {value!r}",
                fix=f"use one of {choices}",
            ) from None


DEFAULT_STATS = StatsRule.CONVEX  # chosen from benchmarks/results/batchnorm_digits.md
