#!/bin/sh
# Measure the filtered retraining of v4 (run from the repository root after
# `memfree testbed train --data runs/v4/data --out runs/v4filt --filter-threshold 4`); about 12 min.
set -e
MF=.venv/bin/memfree
R=reports/v4filt
$MF testbed report --model runs/v4filt/model --json $R/testbed-report.json --quiet > $R/report.log 2>&1
$MF bench filter --model runs/v4filt/model --json $R/bench-filter.json > $R/bench-filter.log 2>&1
$MF calibrate --model runs/v4filt/model --prompts reports/v4/calibration_prompts.txt --fpr 0.01 --quiet > $R/calibrate.log 2>&1
.venv/bin/python reports/v3tok/uncond_copies.py runs/v4filt/model > $R/uncond-copies.json
