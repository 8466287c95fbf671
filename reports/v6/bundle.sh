#!/bin/sh
# The measurements that make the v6 candidate the bundled testbed, on top of reports/v6/measure.sh
# (calibration, detection, explanation, wen on three sets): the testbed report, the full mitigation
# benchmark with the default methods, wen with a target of 0.6 x the threshold on the trigger sets,
# what the empty prompt copies, and AMG's time on held-out prompts. About 100 min on one CPU core.
# Usage: sh reports/v6/bundle.sh [MODEL] [OUT]
set -e
M=${1:-memfree/testbed/model}
R=${2:-reports/v6}
MF=.venv/bin/memfree
$MF testbed report --model $M --json $R/testbed-report.json --quiet
$MF bench mitigate --model $M --json $R/bench-mitigate.json --plot $R/bench-mitigate.png --table $R/bench-mitigate.md --quiet
# (run on 2026-12-02 as two invocations: verbatim, then the other three sets, appended)
.venv/bin/python reports/v5/wen_deeper.py $M verbatim,image_dup,caption_dup,paraphrase 10 > $R/wen-deeper.jsonl
.venv/bin/python reports/v3tok/uncond_copies.py $M > $R/uncond-copies.json
$MF bench overhead --methods amg,amg-screen --set heldout --repeats 7 --json $R/bench-overhead-heldout.json --quiet
