"""`memfree bench overhead`: the time a mitigation adds, measured with repeats and interleaving.

A single timing of a whole benchmark row is at the mercy of whatever else the machine does (on the
2-core CI machine, rows that do identical work differ by ±20%). Here every method runs the same
prompts ``repeats`` times, in turn (none, m1, m2, ..., none, m1, ...), and the ratio to ``none`` is
the median of the per-round ratios, so a slow spell hits all methods of a round alike.
"""
from __future__ import annotations

import statistics
import time

from tqdm.auto import tqdm

from memfree.guidance import AMG_METHODS
from memfree.mitigate import default_index, generate
from memfree.model import Model


def measure_overhead(model: Model, prompts: list[str], methods: list[str], repeats: int = 3, seed: int = 0,
                     progress: bool = True, **kwargs) -> dict:
    """Seconds per image for ``none`` and each method, and each method's median per-round ratio to ``none``.
    AMG methods search the model's own index (loaded once) unless ``train_index`` is given."""
    methods = ["none"] + [m for m in methods if m != "none"]
    if any(m in AMG_METHODS for m in methods) and kwargs.get("train_index") is None:
        kwargs["train_index"] = default_index(model)
    times: dict[str, list[float]] = {m: [] for m in methods}
    generate(model, prompts[:2], "none", seed=seed, progress=False)  # warm-up: first calls are slow
    bar = tqdm(total=repeats * len(methods), desc="bench overhead", disable=not progress)
    for _ in range(repeats):
        for m in methods:
            t0 = time.perf_counter()
            generate(model, prompts, m, seed=seed, progress=False, **(kwargs if m != "none" else {}))
            times[m].append((time.perf_counter() - t0) / len(prompts))
            bar.update(1)
    bar.close()
    rows = []
    for m in methods:
        ratios = [t / b for t, b in zip(times[m], times["none"])]
        rows.append({"method": m, "seconds_per_image": statistics.median(times[m]),
                     "overhead_ratio": statistics.median(ratios), "ratios": ratios})
    return {"prompts": len(prompts), "repeats": repeats, "rows": rows}
