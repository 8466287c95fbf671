#!/bin/sh
# Measure the filtered retraining of v5 (run from the repository root after
#   memfree testbed train --data runs/v5/data --out runs/v5/v5f3 --filter-threshold 3
# with the bundled tokenizer copied to runs/v5/v5f3/tokenizer_build first); about 12 min on 2 cores.
set -e
MF=.venv/bin/memfree
M=runs/v5/v5f3/model
R=reports/v5f3
$MF testbed report --model $M --json $R/testbed-report.json --quiet > $R/report.log 2>&1
$MF bench filter --model $M --json $R/bench-filter.json > $R/bench-filter.log 2>&1
$MF calibrate --model $M --prompts reports/v5/calibration_prompts.txt --fpr 0.01 --quiet > $R/calibrate.log 2>&1
.venv/bin/python reports/v3tok/uncond_copies.py $M > $R/uncond-copies.json
.venv/bin/python reports/v5f3/summary.py runs/v5/v5f3 reports/v5/testbed-report.json $R/testbed-report.json > $R/summary.json
cat $R/summary.json
