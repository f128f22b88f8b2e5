#!/usr/bin/env bash
# Foundation figures (issue 2): perplexity under both protocols, zero-shot accuracy, speed and size, for one
# model, each step one `lmpress ... --json` whose output is kept in benchmarks/results/NAME/.
# usage: benchmarks/foundation.sh NAME MODEL [STEP...]     steps: ppl512 ppl2048 stride512 stride2048 tasks bench
# env: LMPRESS_DATA (default ../shared/data), WINDOWS (limit perplexity windows; empty = the whole text),
#      LIMIT (zero-shot items per task; empty = all), THREADS (eval threads, default 2)
# Then: python benchmarks/report.py benchmarks/results/NAME   prints the markdown tables.
set -euo pipefail
name=$1; model=$2; shift 2
steps=${*:-ppl512 ppl2048 stride512 stride2048 tasks bench}
export LMPRESS_DATA=${LMPRESS_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
out=$(dirname "$0")/results/$name; mkdir -p "$out"
w=${WINDOWS:+--windows $WINDOWS}; l=${LIMIT:+--limit $LIMIT}; t=${THREADS:-2}
run() {  # run STEP ARGS...: keep the JSON, and the command that made it
  local step=$1; shift
  echo "== $name $step: lmpress $*" >&2
  lmpress "$@" --json --quiet > "$out/$step.json.tmp"
  python3 - "$out/$step.json.tmp" "lmpress $*" <<'PY'
import json, sys
p, cmd = sys.argv[1], sys.argv[2]
d = json.load(open(p)); d["command"] = cmd
json.dump(d, open(p, "w"), indent=1)
PY
  mv "$out/$step.json.tmp" "$out/$step.json"
}
for s in $steps; do
  case $s in
    ppl512)     run $s eval "$model" --data wikitext2 --ctx 512 --threads $t $w ;;
    ppl2048)    run $s eval "$model" --data wikitext2 --ctx 2048 --threads $t $w ;;
    stride512)  run $s eval "$model" --data wikitext2 --protocol stride --ctx 512 --threads $t $w ;;
    stride2048) run $s eval "$model" --data wikitext2 --protocol stride --ctx 2048 --threads $t $w ;;
    tasks)      run $s eval "$model" --no-ppl --tasks all --threads $t $l ;;
    bench)      run bench-t1 bench "$model" --threads 1 --repeats 5
                run bench-t2 bench "$model" --threads 2 --repeats 5 ;;
    *) echo "unknown step $s" >&2; exit 2 ;;
  esac
done
