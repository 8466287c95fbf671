r"""Tune AMG's alignment on image-duplicate captions that the benchmark never uses.

Each duplicated face of the testbed is trained under many captions; the benchmark's image_dup set uses a
few of them. This takes the next ``--per-face`` training captions of every face that are in no evaluation
set, with seeds 5000 + i and 6000 + i (the benchmark's are 0, 1000, 2000 and 3000 + i), so what is tuned
here is not what the benchmark measures. Per AMG configuration (overrides of the `amg` preset, any
AMGConfig field): the share memorized (nL2 < 1.4 to any training image), alignment as `memfree bench
mitigate` scores a trigger set (cosine of the probe features to the mean features of the planted faces),
and the paired difference to `none` in points with a 95% bootstrap interval over prompts. One JSON line per
configuration on stdout, with the resolved configuration; the `none` baseline goes to stderr.

It produced docs/results/v5/amg-tune.jsonl, with the preset of the time (its rows name their full
configuration); '{}' now means today's dissimilarity-only preset:

    python experiments/amg_tune.py --config '{}' --config '{"c3": 150}' --config '{"grid": 0}' \
        >> docs/results/v5/amg-tune.jsonl

With ``--triggers suffix`` the trigger captions are instead the verbatim and caption-duplication captions with
a suffix no training caption has (", high quality"): on the latent testbed the faces rarely copy, and every
planted caption that does is in the benchmark, so these are the copying captions it never uses. On a model
with a copy detector (the latent testbed) "memorized" is its verdict (cosine above its threshold); nL2's is
reported beside it (``memorized_nl2``). It produced docs/results/latent/amg-tune.jsonl:

    python experiments/amg_tune.py --model testbed-latent --triggers suffix --seeds 5000 \
        --config '{"lam_lo": 0.8, "lam_hi": 0.85}' ... >> docs/results/latent/amg-tune.jsonl

AMG steers by every index the model folder ships (``index/`` and each ``index-*/``), behind the default screens,
as `--mitigation amg` does; ``--first-index-only`` steers by ``index/`` alone (how the rows above were made). A
configuration may hold, under an index folder's name, values for that index alone, e.g.
``'{"index": {"terms": ["sim"]}, "index-pixels": {"c3": 100}}'``: they go into a scratch copy of the folder's
``tuning.json`` (the other files, and the folder's siblings, linked, not copied), as a tuned value would. With
``--triggers paraphrase`` the triggers are new rewrites of the verbatim captions; with ``--triggers heldout`` they
are the held-out prompts, for what a setting costs on ordinary prompts (``full_checks_per_image``, seconds). These
produced docs/results/latent/amg-tune-{faces,paraphrase,heldout}.jsonl (16,000-step UNet):

    python experiments/amg_tune.py --model testbed-latent --triggers faces --config '{}' \
        --config '{"index": {"terms": ["sim"]}}' --config '{"index-pixels": {"c3": 100}}' \
        --config '{"index": {"terms": ["sim"]}, "index-pixels": {"c3": 100}}' --config '{"index": {"c1": 3, "c2": 3}}'
    python experiments/amg_tune.py --model testbed-latent --triggers paraphrase --config '{}' \
        --config '{"spot_check": 0.82}' --config '{"spot_check": 0.74}' --config '{"spot_check": 0.66}' ...
    python experiments/amg_tune.py --model testbed-latent --triggers heldout --config '{}' \
        --config '{"spot_check": 0.82}' --config '{"spot_check": 0.66}' ...
"""
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from common import experiment_parser, open_testbed, tuning_triggers
from memfree.guidance import config_for_index
from memfree.mitigate import default_index, default_indexes, generate
from memfree.similarity import NL2_THRESHOLD, TUNING_FILE, index_tuning
from memfree_bench.mitigate import trigger_alignment

parser = experiment_parser(__doc__, bootstrap=5000)
parser.add_argument("--config", action="append", metavar="JSON",
                    help='AMG overrides as a JSON object, e.g. \'{"c3": 150}\'; repeatable (default: {}, the preset)')
parser.add_argument("--seeds", default="5000,6000", help="comma-separated base seeds; prompt i gets base + i")
parser.add_argument("--per-face", type=int, default=4, help="unused training captions per face (default: 4)")
parser.add_argument("--triggers", choices=("faces", "suffix", "paraphrase", "heldout"), default="faces",
                    help="unused face captions (default), planted captions with an unseen suffix, paraphrases of "
                         "the verbatim captions that the benchmark does not use, or held-out prompts (for the cost)")
parser.add_argument("--first-index-only", action="store_true", help="steer by index/ alone, not every shipped index")
args = parser.parse_args()

model, tb = open_testbed(args.model)
shipped = [default_index(model)] if args.first_index_only else default_indexes(model)
index = shipped[0]
scratch = Path(tempfile.mkdtemp(prefix="amg-tune-"))


def tuned_copies(per_index: dict) -> list[str]:
    """The shipped index folders, with ``per_index[folder name]`` merged into a scratch copy's tuned ``amg`` values."""
    folders = []
    for ix in shipped:
        values = per_index.get(ix.path.name)
        if not values:
            folders.append(str(ix.path))
            continue
        home = scratch / str(len(list(scratch.iterdir())))   # beside links to its siblings: an index may name
        home.mkdir()                                          # its embedder by a path relative to the model folder
        for f in ix.path.parent.iterdir():
            if f.name != ix.path.name:
                (home / f.name).symlink_to(f.resolve())
        copy = home / ix.path.name
        copy.mkdir()
        for f in ix.path.iterdir():
            if f.name != TUNING_FILE:
                (copy / f.name).symlink_to(f.resolve())
        tuning = index_tuning(ix)
        presets = tuning.setdefault("amg", {})
        presets["amg"] = {**presets.get("amg", {}), **values}
        (copy / TUNING_FILE).write_text(json.dumps(tuning))
        folders.append(str(copy))
    return folders
seeds = [int(s) for s in args.seeds.split(",")]
owners = tuning_triggers(tb, args.triggers, args.per_face)
prompts = [o["prompt"] for o in owners]


def copied(images: torch.Tensor) -> np.ndarray:
    """The testbed's verdict per image: its copy detector's when it has one, else nL2 < 1.4."""
    if tb.copy_index is None:
        return tb.index.search(images).nl2.numpy() < NL2_THRESHOLD
    sim, _ = tb.copy_index.search(tb.copy_index.embedder(images), 1)
    return sim[:, 0].numpy() > tb.copy_threshold


def run(method: str, overrides: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(seeds, prompts) alignment, nL2 and the testbed's copy verdict, and the share of images AMG fired on."""
    shape = (len(seeds), len(prompts))
    align, nl2, copy, fired, checks, seconds = np.zeros(shape), np.zeros(shape), np.zeros(shape, bool), [], [], 0.0
    for a, s in enumerate(seeds):
        per_index = {k: v for k, v in overrides.items() if isinstance(v, dict)}
        shared = {k: v for k, v in overrides.items() if not isinstance(v, dict)}
        options = {"index": tuned_copies(per_index), **shared} if method != "none" else {}
        g = generate(model, prompts, method, seed=s, progress=False, **options)
        with torch.no_grad():
            feats = torch.cat([tb.probe.features(g.images[i:i + 256]) for i in range(0, len(g.images), 256)])
            for name in sorted({o["set"] for o in owners}):
                rows = [i for i, o in enumerate(owners) if o["set"] == name]
                align[a, rows] = trigger_alignment(tb, name, [owners[i] for i in rows], feats[rows])
            nl2[a] = tb.index.search(g.images).nl2.numpy()
            copy[a] = copied(g.images)
        fired += [bool(any(r.extra["amg"]["fired_steps"].values())) for r in g.reports if "amg" in r.extra]
        checks += [r.extra["amg"]["checked_steps"] for r in g.reports if "amg" in r.extra]
        seconds += g.seconds
    return align, nl2, copy, {"fired_rate": float(np.mean(fired)) if fired else 0.0,
                              "full_checks_per_image": float(np.mean(checks)) if checks else 0.0,
                              "seconds_per_image": round(seconds / copy.size, 4)}


base, base_nl2, base_copy, base_stats = run("none", {})
print(f"none: memorized {base_copy.mean():.3f} (nL2 {np.mean(base_nl2 < NL2_THRESHOLD):.3f}), "
      f"alignment {base.mean():.4f}, {base_stats['seconds_per_image']} s/image", file=sys.stderr)
for arg in args.config or ["{}"]:
    overrides = json.loads(arg)
    align, nl2, copy, stats = run("amg", overrides)
    diff = align - base                                   # paired: same prompt, same seed
    rng = np.random.default_rng(0)
    boot = [diff[:, rng.integers(0, diff.shape[1], diff.shape[1])].mean() for _ in range(args.bootstrap)]
    shared = {k: v for k, v in overrides.items() if not isinstance(v, dict)}
    config = {}
    for ix in shipped:
        values = {**shared, **overrides.get(ix.path.name, {})}
        resolved = asdict(config_for_index("amg", ix, model.settings.threshold, **values))
        config[ix.path.name] = {k: v for k, v in resolved.items() if k in (
            "c1", "c2", "c3", "lam_lo", "lam_hi", "terms", "check_every", "grid", "watch", "smooth")}
    row = {"config": config, "overrides": overrides, "triggers": args.triggers, "generations": int(diff.size),
           "none_memorized": float(base_copy.mean()), "memorized": float(copy.mean()),
           "none_memorized_nl2": float(np.mean(base_nl2 < NL2_THRESHOLD)),
           "memorized_nl2": float(np.mean(nl2 < NL2_THRESHOLD)),
           "min_nl2": round(float(nl2.min()), 3), "none_alignment": round(float(base.mean()), 4),
           "alignment": round(float(align.mean()), 4), "difference_points": round(100 * float(diff.mean()), 2),
           "ci95_points": [round(100 * float(np.percentile(boot, q)), 2) for q in (2.5, 97.5)],
           "none_seconds_per_image": base_stats["seconds_per_image"], **stats}
    print(json.dumps(row), flush=True)
