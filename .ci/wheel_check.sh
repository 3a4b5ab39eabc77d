#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it (without the checkout) into a fresh
# virtualenv that sees the already installed dependencies, and run it from another directory.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pip wheel --no-deps -q -w "$work/dist" "$repo"
rm -rf "$repo/build"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install -q --no-deps "$work"/dist/raysft-*.whl
cd "$work"
where="$("$work/venv/bin/python" -c 'import raysft.conf, raysft; print(raysft.__file__)')"
case "$where" in "$work/venv/"*) ;; *) echo "wheel check: raysft imported from $where, not the wheel" >&2; exit 1 ;; esac
raysft="$work/venv/bin/raysft"
"$raysft" --cfg job > job.yaml && grep -q "name_or_path: bundled:smollm3" job.yaml
"$raysft" plan --out "$work/plan" data.date=2026-01-01 > plan.txt && grep -q "data: exact" plan.txt
"$raysft" trainer.max_steps=2 storage.path="$work/runs" storage.name=wheel monitor.sample_prompts=[] > run.txt 2>&1 \
  || { tail -40 run.txt >&2; exit 1; }
test -f "$work/runs/wheel/model/config.json"
echo "wheel check: raysft from the wheel composed, planned and trained 2 steps from $work"
