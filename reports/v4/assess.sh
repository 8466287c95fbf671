#!/bin/sh
# First measurements of a candidate testbed model (default: the v4 run), most important first.
# Usage: sh reports/v4/assess.sh [MODEL] [DATA] [OUT]   (run from the repository root, after training;
# OUT, default reports/v4, receives the figures)
set -e
M=${1:-runs/v4/run/model}
D=${2:-runs/v4/data}
R=${3:-reports/v4}
mkdir -p $R
MF=.venv/bin/memfree
PY=.venv/bin/python
$PY reports/v4/calibration_prompts.py $D > $R/calibration_prompts.txt
$MF calibrate --model $M --prompts $R/calibration_prompts.txt --fpr 0.01
$PY reports/v3tok/uncond_copies.py $M > $R/uncond-copies.json
$MF bench mitigate --model $M --methods none,wen --sets verbatim,heldout --seeds 4 --quiet \
    --json $R/bench-mitigate-wen.json --plot $R/bench-mitigate-wen.png --table $R/bench-mitigate-wen.md
$MF bench filter --model $M --json $R/bench-filter.json
$MF testbed report --model $M --json $R/testbed-report.json --quiet
