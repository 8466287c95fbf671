#!/bin/sh
# Measured on the bundled v6 after bundle.sh (2026-12-03, 2 CPU cores, nothing else running): wen's and
# AMG's time on the mixed set of all 170 evaluation prompts, then AMG's ablation: every variant on the four
# trigger sets, and the ones whose held-out figures say something (the preset, the paper's three-term form,
# the gate always on, the first-step screen) on held-out prompts, appended to the same JSON; then AMG's
# held-out time again. About 25 + 60 + 16 min.
# Produced docs/results/v6/{bench-overhead-mixed.json, bench-mitigate-ablation.*,
# bench-overhead-heldout-quiet.json}.
# The mixed-set `wen` row was timed with its default of the time, the target at the threshold
# (target_scale=1.0); `bench overhead` takes no method options, so this line now times the 0.8 x default.
# Usage: sh experiments/overhead_and_ablation.sh [MODEL [OUT]]   (default: testbed, the bundled model)
set -e
M=${1:-testbed}
R=${2:-docs/results/v6}
MF=${MF:-.venv/bin/memfree}
mkdir -p "$R"
$MF bench overhead --model "$M" --methods wen,amg --set all --repeats 3 --json "$R/bench-overhead-mixed.json" --quiet
A="--json $R/bench-mitigate-ablation.json --plot $R/bench-mitigate-ablation.png"
A="$A --table $R/bench-mitigate-ablation.md --quiet"
$MF bench mitigate --model "$M" $A --sets verbatim,image_dup,caption_dup,paraphrase \
    --methods none,amg,amg-all-terms,amg-no-spe,amg-no-dup,amg-no-sim,amg-always,amg-const,amg-every,amg-screen
$MF bench mitigate --model "$M" $A --sets heldout --methods none,amg,amg-all-terms,amg-always,amg-screen
# AMG's time on held-out prompts again, with the machine to itself (bundle.sh's run shared a core with a
# training run); about 16 min.
$MF bench overhead --model "$M" --methods amg,amg-screen --set heldout --repeats 7 \
    --json "$R/bench-overhead-heldout-quiet.json" --quiet
