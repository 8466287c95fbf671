"""What every experiment starts with: a command line with --model, and the model with its testbed ground truth."""
from __future__ import annotations

import argparse

import numpy as np

import memfree
from memfree_testbed import Testbed, load_testbed
from memfree_testbed.data import paraphrase


def experiment_parser(doc: str, bootstrap: int | None = None) -> argparse.ArgumentParser:
    """An argument parser described by the script's docstring, with --model (default: the bundled testbed) and,
    for scripts that give intervals, --bootstrap with that many resamples by default."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help="model folder or name (default: testbed, the bundled one)")
    if bootstrap is not None:
        parser.add_argument("--bootstrap", type=int, default=bootstrap,
                            help=f"bootstrap resamples over prompts (default: {bootstrap})")
    return parser


def open_testbed(model: str) -> tuple[memfree.Model, Testbed]:
    m = memfree.load(model)
    return m, load_testbed(m)


SUFFIX = ", high quality"   # in no training caption
PARAPHRASE_SEED = 5000       # the tuning paraphrases' random stream (the benchmark's is the data seed + 1)


def tuning_triggers(tb: Testbed, kind: str = "faces", per_face: int = 4) -> list[dict]:
    """Trigger captions that no evaluation set uses, as eval-set-like entries with the set they stand for.

    ``faces``: the next ``per_face`` training captions of every duplicated face. ``suffix``: the verbatim and
    caption-duplication captions with :data:`SUFFIX` appended (on the latent testbed the faces rarely copy, and
    every planted caption that does is in the benchmark; with the suffix most still copy). ``paraphrase``: the
    verbatim captions rewritten by the testbed's own paraphrase rule with another random stream than the benchmark's
    (any rewrite that equals a benchmark prompt is dropped). ``heldout``: the held-out prompts, for what AMG costs on
    ordinary prompts (the tuning gives them other seeds than the benchmark)."""
    if kind == "heldout":   # ordinary prompts: the benchmark's own, which the tuning runs at other seeds
        return [{**e, "set": "heldout"} for e in tb.eval_sets["heldout"]]
    if kind == "paraphrase":
        used = {e["prompt"] for entries in tb.eval_sets.values() for e in entries}
        rng = np.random.default_rng(PARAPHRASE_SEED)
        rewrites = [{**e, "prompt": paraphrase(e["prompt"], rng), "set": "paraphrase"}
                    for e in tb.eval_sets["verbatim"]]
        return [e for e in rewrites if e["prompt"] not in used]
    if kind == "suffix":
        return [{**e, "prompt": e["prompt"] + SUFFIX, "set": name}
                for name in ("verbatim", "caption_dup") for e in tb.eval_sets[name]]
    used = {e["prompt"] for entries in tb.eval_sets.values() for e in entries}
    by_face: dict[int, list[str]] = {}
    for t in tb.manifest["train"]:
        if t["kind"] == "image_dup" and t["caption"] not in used and t["caption"] not in by_face.get(t["image"], []):
            by_face.setdefault(t["image"], []).append(t["caption"])
    return [{"prompt": c, "image": face, "set": "image_dup"}
            for face in sorted(by_face) for c in by_face[face][:per_face]]


def judged_twice(tb: Testbed, images) -> dict:
    """The share of ``images`` memorized by pixel nL2 (< 1.4, the testbed's pixel index) and by the testbed's copy
    detector (cosine over its threshold): two judges, so that guidance cannot fool the one it is guided by."""
    from memfree.similarity import NL2_THRESHOLD
    sim, _ = tb.copy_index.search(tb.copy_index.embedder(images), 1)
    return {"memorized_nl2": float((tb.index.search(images).nl2 < NL2_THRESHOLD).float().mean()),
            "memorized_detector": float((sim[:, 0] > tb.copy_threshold).float().mean())}
