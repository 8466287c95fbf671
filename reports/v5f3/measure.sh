#!/bin/sh
# Measure a filtered retraining of the testbed (run from the repository root after
#   memfree testbed train --data DATA --out RUN --filter-threshold TAU
# with the bundled tokenizer copied to RUN/tokenizer_build first); about 12 min on 2 cores.
# Usage: sh reports/v5f3/measure.sh [RUN [OUT [BASE]]]
#   default: runs/v5/v5f3 into reports/v5f3, the v5 tau 3 run; BASE is the unfiltered model's report
#   folder (its testbed-report.json and calibration_prompts.txt), reports/v5 unless given
#   (reports/v6 for a retraining of v6).
set -e
MF=.venv/bin/memfree
RUN=${1:-runs/v5/v5f3}
R=${2:-reports/v5f3}
B=${3:-reports/v5}
M=$RUN/model
mkdir -p $R
$MF testbed report --model $M --json $R/testbed-report.json --quiet > $R/report.log 2>&1
$MF bench filter --model $M --json $R/bench-filter.json > $R/bench-filter.log 2>&1
$MF calibrate --model $M --prompts $B/calibration_prompts.txt --fpr 0.01 --quiet > $R/calibrate.log 2>&1
.venv/bin/python reports/v3tok/uncond_copies.py $M > $R/uncond-copies.json
.venv/bin/python reports/v5f3/summary.py $RUN $B/testbed-report.json $R/testbed-report.json > $R/summary.json
cat $R/summary.json
