#!/usr/bin/env bash
# Every GPU table of the README in one run, meant to be started detached on the GPU machine:
#
#   RESULTS=/tmp/results setsid nohup bash benchmarks/run_all.sh [STEP ...] > /tmp/run_all.log 2>&1 &
#
# Steps (default: all, in this order): serving main-command suite ablation. Each writes its JSON (and .md,
# .log) into $RESULTS as it goes, so a run cut short still leaves every finished table. The code runs from
# a copy taken at start, so later changes to the checkout cannot mix two versions into one table.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${RESULTS:-$here/benchmarks/results}"
JOBS="${JOBS:-4}"
mkdir -p "$RESULTS"
code="$(mktemp -d /tmp/surgeon-code.XXXX)"
cp -r "$here/surgeon" "$here/benchmarks" "$code/"
cd "$code"
export PYTHONPATH="$code${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(serving main-command suite ablation)

for step in "${steps[@]}"; do
    echo "== $step $(date +%T)"
    case "$step" in
        serving)      python benchmarks/bench_serving.py --out "$RESULTS/serving.json" ;;
        main-command) python benchmarks/bench_main_command.py --out "$RESULTS/main-command.json" ;;
        suite)        python benchmarks/bench_smollm2.py --set main --jobs "$JOBS" --out "$RESULTS/smollm2.json" ;;
        ablation)     python benchmarks/bench_smollm2.py --set structured,unstructured --jobs "$JOBS" --deterministic \
                          --out "$RESULTS/ablation.json" ;;
        *) echo "unknown step $step" >&2 ;;
    esac > "$RESULTS/$step.log" 2>&1
    echo "   $step exit $? $(date +%T)"
done
echo "== done $(date +%T)"
