#!/bin/sh
# Measured on the bundled v6 after bundle.sh (2026-12-03, 2 CPU cores, nothing else running):
# wen's and AMG's time on the mixed set of all 170 evaluation prompts (issue 4 asks for wen's), then
# AMG's ablation: every variant on the four trigger sets, and the ones whose held-out figures say
# something (the preset, the paper's three-term form, the gate always on, the first-step screen) on
# held-out prompts, appended to the same JSON; then AMG's held-out time again. About 25 + 60 + 16 min.
# Usage: sh reports/v6/overhead_and_ablation.sh [MODEL] [OUT]
set -e
M=${1:-memfree/testbed/model}
R=${2:-reports/v6}
MF=.venv/bin/memfree
$MF bench overhead --model $M --methods wen,amg --set all --repeats 3 --json $R/bench-overhead-mixed.json --quiet
A="--model $M --json $R/bench-mitigate-ablation.json --plot $R/bench-mitigate-ablation.png --table $R/bench-mitigate-ablation.md --quiet"
$MF bench mitigate $A --sets verbatim,image_dup,caption_dup,paraphrase \
    --methods none,amg,amg-all-terms,amg-no-spe,amg-no-dup,amg-no-sim,amg-always,amg-const,amg-every,amg-screen
$MF bench mitigate $A --sets heldout --methods none,amg,amg-all-terms,amg-always,amg-screen
# AMG's time on held-out prompts again, with the machine to itself (bundle.sh's run shared a core
# with a training run); about 16 min.
$MF bench overhead --model $M --methods amg,amg-screen --set heldout --repeats 7 --json $R/bench-overhead-heldout-quiet.json --quiet
