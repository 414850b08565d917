#!/usr/bin/env bash
# Every GPU table of the README in one run, meant to be started detached on the GPU machine:
#
#   RESULTS=/tmp/results setsid nohup bash benchmarks/run_all.sh [STEP ...] > /tmp/run_all.log 2>&1 &
#
# Steps (default: all, in this order):
#   structured    structured LLM Surgeon at its defaults, alone on the GPU (honest times), one schedule read at
#                 90/80/70% size; writes the allocations that `serving` scales to the 7B shape
#   main-command  the README's main command from the shell, alone (cold and warm model cache)
#   serving       7B-shaped prefill/decode speed of those allocations, alone
#   tables        the rest of the results table and the ablations, several runs sharing the GPU at once
# and steps for filling in parts of the tables (each alone on the GPU, in the order given):
#   missing       the unstructured and 2:4 rows of the results table (smollm2-fill.json, merged into
#                 smollm2.json with benchmarks/merge_results.py)
#   main-rest     the rest of the results table, one run at a time (smollm2.json)
#   ablate-damping       benchmarks/ablations/damping.py (ablation-damping.json)
#   ablate-structured    rows A7-A8 of benchmarks/ablations/structured.py (ablation-structured-2.json)
#   ablate-unstructured  benchmarks/ablations/unstructured.py (ablation-unstructured.json)
#   ablate-24            rows C3-C4 of benchmarks/ablations/unstructured.py (ablation-24.json)
#   ablate-defaults      benchmarks/ablations/defaults.py: the structured defaults before (ablation-defaults.json)
#   ablate-refit         row C6 of benchmarks/ablations/unstructured.py: 2:4 without the final refit (ablation-refit.json)
#   ablate-refit-u       row B5: unstructured with the final refit (ablation-refit-u.json)
#   ablate-mask          rows C7-C8 of benchmarks/ablations/unstructured.py: ADMM's 2:4 mask, K-FAC's update (ablation-mask.json)
#   ablate-24b           rows C9-C11 one at a time: ADMM's mask with the sampled Fisher, low-rank fits distilled
#                        from the dense model (ablation-24b.json; at c7f20a2 C7-C11 ran five at once, --jobs 5,
#                        which this model's runs do not share well)
#   ablate-admm-shots    rows C12-C14: ADMM's selection in the last 8 / 4 shots, rows paced one by one
#                        (ablation-admm-shots.json)
#   ablate-24c           rows C4, C5, C15, C16 one at a time: what ties the 2:4 default to the calibration domain
#                        (labels from the model, damping; ablation-24c.json; C4 is C9's configuration now that
#                        ADMM's last-shot mask is the default)
#   ablate-distil-24     row C10 alone: the 2:4 default with low-rank fits distilled from the dense model
#                        (ablation-distil-24.json)
#   repeat-24            the 2:4 rows of LLM Surgeon and ADMM at their defaults, three rounds (repeat-24.json):
#                        how far one run of each moves between repeats
#   repeat-24c           rows C15 and C16 of benchmarks/ablations/unstructured.py, two rounds (repeat-24c.json)
#   repeat-u             the unstructured 50% row of LLM Surgeon at its defaults, two rounds (repeat-u.json)
#   ablate-24d           row C17 of benchmarks/ablations/unstructured.py: A damped 0.03 of its mean diagonal (ablation-24d.json)
#   ablate-24e           rows C18-C20: A damped relative to its own diagonal, as ADMM damps it, by 0.1, 0.03
#                        and 0.3 (ablation-24e.json); repeat-24e runs them again (repeat-24e.json)
#   ablate-u-diag        row B6: the same damping, 0.1, for unstructured 50% (ablation-u-diag.json)
#   select-24            the 2:4 default beside rows C18 and C19, with the held-out windows the damping is chosen
#                        on (select-24.json)
#   select-u             the unstructured 50% default beside row B6, the same (select-u.json)
#   ablate-uniform       row A8 of benchmarks/ablations/structured.py: one shape for every layer (ablation-uniform.json)
#   serving-compiled     decode with the step compiled by torch.compile, dense vs 80% (serving-compiled.json)
# `serving` and `serving-compiled` read the allocations in $ALLOC (default: $RESULTS, where `structured`
# writes them).
# Each writes its JSON (and .md, .log) into $RESULTS as it goes, so a run cut short still leaves every
# finished table. The code runs from a copy taken at start, so later changes to the checkout cannot mix
# two versions into one table.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${RESULTS:-$here/benchmarks/results}"
JOBS="${JOBS:-3}"
ALLOC="${ALLOC:-$RESULTS}"
mkdir -p "$RESULTS"
code="$(mktemp -d /tmp/surgeon-code.XXXX)"
cp -r "$here/surgeon" "$here/rust" "$here/benchmarks" "$code/"  # every core folder: the digest in versions covers them
cd "$code"
export PYTHONPATH="$code${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(structured main-command serving tables)
bench="python benchmarks/bench_smollm2.py"

for step in "${steps[@]}"; do
    echo "== $step $(date +%T)"
    case "$step" in
        structured)   $bench --set main --only "llm-surgeon structured" --allocations "$RESULTS" \
                          --out "$RESULTS/smollm2-structured.json" ;;
        main-command) python benchmarks/bench_main_command.py --out "$RESULTS/main-command.json" ;;
        serving)      python benchmarks/bench_serving.py --report "$ALLOC"/allocation-llm-surgeon-{90,80,70}.json \
                          --uniform 0.8 --align 1 64 --reps 3 --out "$RESULTS/serving.json" ;;
        tables)       $bench --set main --exclude "llm-surgeon structured" --jobs "$JOBS" --out "$RESULTS/smollm2.json" \
                          > "$RESULTS/suite.log" 2>&1 &
                      $bench --set structured,unstructured --jobs "$JOBS" --out "$RESULTS/ablation.json" ;
                      wait ;;
        missing)      $bench --set main --structures unstructured,2:4 --out "$RESULTS/smollm2-fill.json" ;;
        main-rest)    $bench --set main --exclude "llm-surgeon structured" --out "$RESULTS/smollm2.json" ;;
        ablate-damping)      $bench --set damping --out "$RESULTS/ablation-damping.json" ;;
        ablate-structured)   $bench --set structured --only "A7 ,A8 " \
                                 --out "$RESULTS/ablation-structured-2.json" ;;
        ablate-unstructured) $bench --set unstructured --out "$RESULTS/ablation-unstructured.json" ;;
        ablate-24)           $bench --set unstructured --only "C3 ,C4 " --out "$RESULTS/ablation-24.json" ;;
        ablate-defaults)     $bench --set defaults --out "$RESULTS/ablation-defaults.json" ;;
        ablate-refit)        $bench --set unstructured --only "C6 " --out "$RESULTS/ablation-refit.json" ;;
        ablate-refit-u)      $bench --set unstructured --only "B5 " --out "$RESULTS/ablation-refit-u.json" ;;
        ablate-mask)         $bench --set unstructured --only "C7 ,C8 " --out "$RESULTS/ablation-mask.json" ;;
        ablate-24b)          $bench --set unstructured --only "C9 ,C10 ,C11 " --out "$RESULTS/ablation-24b.json" ;;
        ablate-admm-shots)   $bench --set unstructured --only "C12 ,C13 ,C14 " --out "$RESULTS/ablation-admm-shots.json" ;;
        ablate-24c)          $bench --set unstructured --only "C5 ,C4 ,C16 ,C15 " --out "$RESULTS/ablation-24c.json" ;;
        ablate-distil-24)    $bench --set unstructured --only "C10 " --out "$RESULTS/ablation-distil-24.json" ;;
        repeat-24)           $bench --set main --structures 2:4 --only "llm-surgeon 2:4,admm" --repeat 3 \
                                 --out "$RESULTS/repeat-24.json" ;;
        repeat-24c)          $bench --set unstructured --only "C16 ,C15 " --repeat 2 --out "$RESULTS/repeat-24c.json" ;;
        repeat-u)            $bench --set main --structures unstructured --only "llm-surgeon unstructured" --repeat 2 \
                                 --out "$RESULTS/repeat-u.json" ;;
        ablate-24d)          $bench --set unstructured --only "C17 " --out "$RESULTS/ablation-24d.json" ;;
        ablate-24e)          $bench --set unstructured --only "C18 ,C19 ,C20 " --out "$RESULTS/ablation-24e.json" ;;
        repeat-24e)          $bench --set unstructured --only "C18 ,C19 ,C20 " --out "$RESULTS/repeat-24e.json" ;;
        ablate-u-diag)       $bench --set unstructured --only "B6 " --out "$RESULTS/ablation-u-diag.json" ;;
        select-24)           $bench --set main,unstructured --structures 2:4 --only "llm-surgeon 2:4,C18 ,C19 " \
                                 --out "$RESULTS/select-24.json" ;;
        select-u)            $bench --set main,unstructured --structures unstructured --only "llm-surgeon unstructured,B6 " \
                                 --out "$RESULTS/select-u.json" ;;
        ablate-uniform)      $bench --set structured --only "A8 " --out "$RESULTS/ablation-uniform.json" ;;
        serving-compiled)    python benchmarks/bench_serving.py --compile --report "$ALLOC/allocation-llm-surgeon-80.json" \
                                 --uniform 0.8 --align 64 --no-sweep --reps 3 --out "$RESULTS/serving-compiled.json" ;;
        *) echo "unknown step $step" >&2 ;;
    esac > "$RESULTS/$step.log" 2>&1
    echo "   $step exit $? $(date +%T)"
done
echo "== done $(date +%T)"
