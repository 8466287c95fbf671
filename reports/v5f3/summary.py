"""The filter acceptance in one table: planted copies pooled over verbatim, image_dup and caption_dup
generations (4 seeds each), by kind, and held-out alignment, unfiltered against filtered. Copies are
counted two ways: `copy` (nL2 < 1.4 to the prompt's own planted image, the report's headline rule)
and `any` (nL2 < 1.4 to any training image, which also counts an image_dup face of another caption
of the group). Plus the
share of each kind's captioned samples the filter kept over the run (mean of the per-log shares).
Usage: python reports/v5f3/summary.py RUN_DIR UNFILTERED_REPORT FILTERED_REPORT"""
import json
import sys
from pathlib import Path

run, base, filt = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), json.loads(Path(sys.argv[3]).read_text())
KINDS = ("verbatim", "image_dup", "caption_dup")  # the planted kinds pooled


def pooled(rep: dict, field: str) -> dict:
    n = {k: rep["sets"][k]["generations"] for k in KINDS}  # prompts × seeds, as the report ran them
    copies = {k: round(rep["sets"][k][field] * n[k]) for k in KINDS}
    return {"copies": sum(copies.values()), "generations": sum(n.values()),
            "rate": round(sum(copies.values()) / sum(n.values()), 4), "by_kind": copies}


def side(rep: dict) -> dict:
    return {"pooled_copy": pooled(rep, "copy_rate"), "pooled_any": pooled(rep, "memorization_rate"),
            **{k: rep[k] for k in keys}}


state = json.loads((run / "train_state.json").read_text())
kept = [e["kept"] for e in state["log"] if "kept" in e]
keep_mean = {k: round(sum(e[k] for e in kept) / len(kept), 3) for k in kept[0]} if kept else {}
keys = ["verbatim_memorization_rate", "image_dup_memorization_rate", "caption_dup_memorization_rate",
        "paraphrase_memorization_rate", "heldout_memorization_rate", "seen_once_memorization_rate", "heldout_alignment"]
print(json.dumps({"unfiltered": side(base), "filtered": side(filt),
                  "alignment_change_points": round(100 * (filt["heldout_alignment"] - base["heldout_alignment"]), 1),
                  "filter_kept_mean_share": keep_mean, "train_seconds": state["elapsed_s"]},
                 indent=2))
