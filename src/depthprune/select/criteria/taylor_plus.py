"""``taylor-plus``: Shortened LLaMA's Taylor+ criterion (Kim et al. 2024): the ``taylor`` importance, with the
first four and the last two layers kept out of the candidates.

Kim et al. found that the Taylor importance of the first and last blocks understates what removing them
costs, and their released code (``block_prune.py``'s "plus heuristic") drops blocks 0-3, L-2 and L-1 from the
unimportance order before taking the first n. Here those six layers go to the end of the ranking instead
(still by importance among themselves), which is the same choice whenever n <= L - 6 and still a choice for
larger n or models of six layers or fewer. The importance is computed once and shared with ``taylor``.
Its scores: every layer's importance, the ranking, and the layers it protects.
"""

from __future__ import annotations

from .. import CRITERIA, Criterion, Selection, SelectionContext
from .taylor import least_important

FIRST_KEPT, LAST_KEPT = 4, 2  # the blocks Kim et al.'s heuristic protects at each end


def protected_layers(num_layers: int) -> list[int]:
    """The first four and the last two layers (all of them in a model of six layers or fewer)."""
    return sorted(set(range(min(FIRST_KEPT, num_layers))) | set(range(max(0, num_layers - LAST_KEPT), num_layers)))


def select(context: SelectionContext, n: int) -> Selection:
    return least_important(context, n, "taylor-plus", frozenset(protected_layers(context.num_layers)))


CRITERION = CRITERIA.register(Criterion(
    name="taylor-plus",
    description="taylor with the first four and last two layers removed only after every other one "
                "(Shortened LLaMA's Taylor+, Kim et al. 2024)",
    needs="calibration",
    contiguous=False,
    select=select,
    order=80,
))
