#!/bin/sh
# Measurements of the v6 candidate (verbatim captions `named`: a seen composition's caption plus one
# painter's surname), most important first: what issues 3 and 4 fell short on with v5.
# Usage, from the repository root after training:  sh reports/v6/measure.sh [MODEL] [DATA] [OUT]
set -e
M=${1:-runs/v6/run/model}
D=${2:-runs/v6/data}
R=${3:-reports/v6}
mkdir -p $R
MF=.venv/bin/memfree
PY=.venv/bin/python
$PY reports/v4/calibration_prompts.py $D > $R/calibration_prompts.txt
$MF calibrate --model $M --prompts $R/calibration_prompts.txt --fpr 0.01 > $R/calibration.json
$MF bench mitigate --model $M --methods none,wen --sets verbatim,paraphrase,heldout --seeds 4 --quiet \
    --json $R/bench-mitigate-wen.json --plot $R/bench-mitigate-wen.png --table $R/bench-mitigate-wen.md
$MF bench detect --model $M --json $R/bench-detect.json --plot $R/bench-detect-roc.png --quiet
$PY reports/v5/wen_trajectory.py $M > $R/wen-trajectory.json
