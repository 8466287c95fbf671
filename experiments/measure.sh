#!/bin/sh
# First measurements of the v6 candidate (verbatim captions `named`: a seen composition's caption plus one
# painter's surname), most important first: calibration prompts and threshold, `wen` against `none` on
# three sets, the detection benchmark, and where along the trajectory wen's copies come back.
# Produced docs/results/v6/{calibration_prompts.txt, calibration.json, bench-mitigate-wen.*, bench-detect*,
# wen-trajectory.json} (as reports/v6/measure.sh did).
# `wen` is run with its target at the threshold (target_scale=1.0), the default when these were measured;
# the default is now 0.8 x.
# Usage, from the repository root after training:  sh experiments/measure.sh [MODEL [DATA [OUT]]]
set -e
M=${1:-runs/v6/run/model}
D=${2:-runs/v6/data}
R=${3:-docs/results/v6}
MF=${MF:-.venv/bin/memfree}
PY=${PY:-.venv/bin/python}
mkdir -p "$R"
$PY experiments/calibration_prompts.py --data "$D" > "$R/calibration_prompts.txt"
$MF calibrate --model "$M" --prompts "$R/calibration_prompts.txt" --fpr 0.01 --quiet > "$R/calibration.json"
$MF bench mitigate --model "$M" --methods none,wen --opt wen:target_scale=1.0 --sets verbatim,paraphrase,heldout \
    --seeds 4 --quiet --json "$R/bench-mitigate-wen.json" --plot "$R/bench-mitigate-wen.png" \
    --table "$R/bench-mitigate-wen.md"
$MF bench detect --model "$M" --json "$R/bench-detect.json" --plot "$R/bench-detect-roc.png" --quiet
$PY experiments/wen_trajectory.py --model "$M" > "$R/wen-trajectory.json"
