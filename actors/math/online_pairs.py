"""Online DPO's labelling: the best and the worst of each prompt's k samples become one preference pair.

Pure (no Ray, no models) so it can be tested exactly. The same rule as the offline preference data's
``pairing: best_vs_worst`` (jobs.experiment.preference_data.label_pairs), on row indices instead of texts.
"""

from __future__ import annotations

from typing import Sequence


def best_worst_pairs(scores: Sequence[float], usable: Sequence[bool], group_size: int,
                     min_gap: float = 0.0) -> list[tuple[int, int]]:
    """(chosen row, rejected row) for each group of ``group_size`` contiguous rows (one prompt's samples).

    Only ``usable`` rows compete (an empty response, an immediate EOS, has nothing to prefer); chosen is
    the highest score (the first of tied rows), rejected the lowest (the first of tied rows). A group
    gives no pair when fewer than two rows are usable or its best and worst differ by ``min_gap`` or less
    (all tied when ``min_gap`` is 0).
    """
    scores, usable = [float(s) for s in scores], [bool(u) for u in usable]
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to form pairs, got {group_size}")
    if len(scores) != len(usable) or len(scores) % group_size:
        raise ValueError(f"{len(scores)} scores and {len(usable)} usable flags do not make groups of {group_size}")
    pairs = []
    for start in range(0, len(scores), group_size):
        rows = [i for i in range(start, start + group_size) if usable[i]]
        if len(rows) < 2:
            continue
        best = max(rows, key=lambda i: (scores[i], -i))
        worst = min(rows, key=lambda i: (scores[i], i))
        if scores[best] - scores[worst] > min_gap:
            pairs.append((best, worst))
    return pairs
