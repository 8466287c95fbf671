#!/bin/sh
# The measurements that made the v6 candidate the bundled testbed, on top of experiments/measure.sh
# (calibration, detection, wen on three sets): the testbed report, the full mitigation benchmark with the
# default methods, wen with targets under the threshold on the trigger sets, what the empty prompt copies,
# and AMG's time on held-out prompts. About 100 min on one CPU core without the wen-targets line (as
# reports/v6/bundle.sh did, 2026-12-02).
# Produced docs/results/v6/{testbed-report.json, bench-mitigate.*, wen-deeper.jsonl, wen-targets.jsonl,
# uncond-copies.json, bench-overhead-heldout.json}.
# `wen` is run with its target at the threshold (target_scale=1.0), the default when these were measured.
# Usage: sh experiments/bundle.sh [MODEL [OUT]]   (MODEL: a folder or a name; default: testbed, the bundled one)
set -e
M=${1:-testbed}
R=${2:-docs/results/v6}
MF=${MF:-.venv/bin/memfree}
PY=${PY:-.venv/bin/python}
mkdir -p "$R"
$MF testbed report --model "$M" --json "$R/testbed-report.json" --quiet
$MF bench mitigate --model "$M" --opt wen:target_scale=1.0 --quiet \
    --json "$R/bench-mitigate.json" --plot "$R/bench-mitigate.png" --table "$R/bench-mitigate.md"
# wen at 0.6 x the threshold (run on 2026-12-02 as two invocations: verbatim, then the other three sets, appended)
$PY experiments/wen_targets.py --model "$M" --sets verbatim,image_dup,caption_dup,paraphrase --iters 10 --scales 0.6 \
    > "$R/wen-deeper.jsonl"
# wen at 0.9, 0.8 and 0.7 x (measured after this recipe, on a quiet machine; commit c3a89af)
$PY experiments/wen_targets.py --model "$M" --sets verbatim,image_dup,caption_dup,paraphrase --iters 10 \
    --scales 0.9,0.8,0.7 > "$R/wen-targets.jsonl"
$PY experiments/uncond_copies.py --model "$M" > "$R/uncond-copies.json"
$MF bench overhead --model "$M" --methods amg,amg-screen --set heldout --repeats 7 \
    --json "$R/bench-overhead-heldout.json" --quiet
