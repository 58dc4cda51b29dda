#!/usr/bin/env bash
# Build a shipped tuning cache for this machine's GPU, resumably, within a time budget.
#
#   bash benchmarks/make_cache.sh DB [SECONDS [OUTDIR]]
#
# DB: the tuning database to profile into (a SQLite path; created, or resumed where an earlier run stopped).
# SECONDS: the wall-clock budget for this call (default 540); each step gets what is left and is stopped with
# SIGINT, which keeps every trial measured so far — run the same command again (on the same DB) to go on.
# OUTDIR: where the cache file goes (default: the installed package's dora_tune/caches/).
#
# Steps, each skipped once done (every `dora-tune profile` measures only what is missing):
#   1. the default shape set, bf16;                2. the five model presets, bf16;
#   3. the norm at ranks 32 and 256 (default set, then presets); 3b. the whole DoRA linear's default set
#      (`--op dora_linear`: not in the default profile);
#   4. the confirmation stage (each shape's fastest trials re-timed together);
#   5. fit, bf16 only (an fp16 table fitted on --quick shortlists alone would plan worse than the bf16 one);
#   6. export OUTDIR/<gpu-slug>.sqlite (read-only friendly: rollback journal, vacuumed).
# What it prints is also appended to DB.log. docs/cross-gpu.md says how the H100 cache is meant to be made with it.
set -u
DB=${1:?usage: make_cache.sh DB [SECONDS]}
BUDGET=${2:-540}
OUTDIR=${3:-$(python3 -c "import os, dora_tune; print(os.path.join(os.path.dirname(dora_tune.__file__), 'caches'))")}
START=$(date +%s)
LOG="$DB.log"
PRESETS=(--model llama-3-8b --model llama-3-70b --model mistral-7b --model qwen2.5-7b --model qwen2.5-32b)
PROFILE=(python3 -m dora_tune profile --gpu auto --no-progress --db "$DB" --confirm-top 0)

left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "[make_cache $(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }

# run "name" cmd...: skipped when DB.log says the step finished; stopped by SIGINT when the budget runs out
step() {
    local name=$1
    shift
    if grep -q "^done $name\$" "$LOG" 2>/dev/null; then
        return 0
    fi
    local t
    t=$(left)
    if [ "$t" -lt 20 ]; then
        say "budget spent before '$name': run the same command again to go on"
        exit 3
    fi
    say "$name (up to $t s): $*"
    timeout -s INT "$t" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        echo "done $name" >>"$LOG"
    else
        say "'$name' stopped (exit $rc): what it measured is kept; run the same command again to go on"
        exit 3
    fi
}

step default "${PROFILE[@]}"
step presets "${PROFILE[@]}" "${PRESETS[@]}"
step ranks "${PROFILE[@]}" --op norm --rank 32 --rank 256
step ranks-presets "${PROFILE[@]}" --op norm --rank 32 --rank 256 "${PRESETS[@]}"
step linear "${PROFILE[@]}" --op dora_linear
step confirm python3 -m dora_tune profile --gpu auto --no-progress --db "$DB" --confirm-only
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')")
SLUG=$(python3 -c "import sys; from dora_tune.autotune_db import gpu_slug; print(gpu_slug(sys.argv[1]))" "$GPU")
step fit python3 -m dora_tune fit --db "$DB" --gpu "$GPU" --dtype bf16
CACHE="$OUTDIR/$SLUG.sqlite"
step export python3 -m dora_tune cache export "$CACHE" --db "$DB" --gpu "$GPU" --overwrite
python3 - "$CACHE" <<'EOF'
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.execute("PRAGMA journal_mode=DELETE")
con.execute("VACUUM")
con.close()
EOF
chmod 644 "$CACHE"
say "wrote $CACHE for $GPU; add its entry to dora_tune/caches/README.md (command, date, versions, figures)"
