#!/bin/sh
# Full measurement of the bundled v5 model into reports/v5, most important first (about 2 h on 2 CPU
# cores). `bench mitigate` resumes from its JSON, so an interrupted run can be started again.
set -e
MF=.venv/bin/memfree
R=reports/v5
$MF bench mitigate --json $R/bench-mitigate.json --plot $R/bench-mitigate.png --table $R/bench-mitigate.md --quiet
$MF bench detect --json $R/bench-detect.json --plot $R/bench-detect-roc.png --quiet
$MF bench mitigate --methods none,amg-all-terms,amg-no-spe,amg-no-dup,amg-no-sim,amg-always,amg-const,amg-every,amg-screen \
    --json $R/bench-mitigate.json --plot $R/bench-mitigate.png --table $R/bench-mitigate.md --quiet
$MF bench overhead --methods amg,amg-screen,wen --set heldout --repeats 3 --json $R/bench-overhead-heldout.json --quiet
