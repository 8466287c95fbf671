"""`memfree bench overhead`: the time a mitigation adds, measured with repeats and fine interleaving.

A single timing of a whole benchmark row is at the mercy of whatever else the machine does (on the
2-core CI machine, rows that do identical work differ by ±20%, and whole-set rounds of the same
work by ±3%). So the prompts are cut into chunks of one sampling batch, and every chunk is generated
by every method back to back, in an order that reverses from one chunk to the next (none, m1, m2,
then m2, m1, none, ...): a slow spell of a few seconds then falls on all methods alike, and a steady
drift cancels. A round is one pass over all chunks; its ratio is a method's total time over
``none``'s, and the reported ratio is the median over rounds.

Beside the wall-clock ratio, ``piece_share`` is the time spent inside the sampling loop's pieces
(AMG's similarity checks and guidance terms), timed directly, over ``none``'s time: the same cost
without the scatter of whole-run timings, though blind to anything the pieces slow down outside
themselves (which the wall-clock ratio includes).
"""
from __future__ import annotations

import statistics
import time

from tqdm.auto import tqdm

from memfree.guidance import AMG_METHODS
from memfree.mitigate import default_index, generate
from memfree.model import Model


def measure_overhead(model: Model, prompts: list[str], methods: list[str], repeats: int = 3, seed: int = 0,
                     progress: bool = True, chunk: int = 16, **kwargs) -> dict:
    """Seconds per image for ``none`` and each method, each method's median per-round ratio to ``none``,
    and its median ``piece_share``. Image i gets seed + i whatever the chunking, so the images are those
    of one whole-set request. AMG methods search the model's own index (loaded once) unless
    ``train_index`` is given."""
    if not prompts:
        raise ValueError("no prompts given")
    if repeats < 1 or chunk < 1:
        raise ValueError("repeats and chunk must be at least 1")
    methods = ["none"] + [m for m in methods if m != "none"]
    if any(m in AMG_METHODS for m in methods) and kwargs.get("index") is None:
        kwargs["index"] = default_index(model)
    starts = list(range(0, len(prompts), chunk))
    seconds = {m: [0.0] * repeats for m in methods}
    in_pieces = {m: [0.0] * repeats for m in methods}
    generate(model, prompts[:2], "none", seed=seed, progress=False)  # warm-up: first calls are slow
    bar = tqdm(total=repeats * len(starts) * len(methods), desc="bench overhead", disable=not progress)
    for r in range(repeats):
        for c, lo in enumerate(starts):
            for m in (methods if (r * len(starts) + c) % 2 == 0 else methods[::-1]):
                t0 = time.perf_counter()
                g = generate(model, prompts[lo:lo + chunk], m, seed=seed + lo, progress=False,
                             batch_size=chunk, **(kwargs if m in AMG_METHODS else {}))
                seconds[m][r] += time.perf_counter() - t0
                in_pieces[m][r] += g.piece_seconds
                bar.update(1)
    bar.close()
    rows = []
    for m in methods:
        ratios = [t / b for t, b in zip(seconds[m], seconds["none"])]
        shares = [p / b for p, b in zip(in_pieces[m], seconds["none"])]
        rows.append({"method": m, "seconds_per_image": statistics.median(seconds[m]) / len(prompts),
                     "overhead_ratio": statistics.median(ratios), "ratios": ratios,
                     "piece_share": statistics.median(shares)})
    return {"prompts": len(prompts), "repeats": repeats, "chunk": chunk, "rows": rows}
