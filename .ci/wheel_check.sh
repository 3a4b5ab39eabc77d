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
"$raysft" data preview --rows 1 --no-color > preview.txt && grep -q "example 1/1 · source gsm8k_think" preview.txt
"$raysft" sweep=lr --cfg job > sweep.yaml && grep -q "^  name: lr" sweep.yaml
# A primary config of one's own over the packaged schema and groups, as a sweep's best.yaml is.
mkdir -p mine && printf 'defaults:\n  - base_config\n  - _self_\ntrainer:\n  learning_rate: 0.0042\n' > mine/best.yaml
"$raysft" --config-dir "$work/mine" --config-name best --cfg job > best.txt && grep -q "learning_rate: 0.0042" best.txt
"$raysft" trainer.max_steps=2 storage.path="$work/runs" storage.name=wheel monitor.sample_prompts=[] > run.txt 2>&1 \
  || { tail -40 run.txt >&2; exit 1; }
test -f "$work/runs/wheel/model/config.json"
echo "wheel check: raysft from the wheel composed (default, sweep, own config dir), planned, previewed data and trained 2 steps from $work"
