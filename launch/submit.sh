#!/usr/bin/env bash
# Submit a raysft run to a Ray cluster as a Ray job, stream its logs, exit with its status.
#
#   launch/submit.sh [--address ADDR] [--submission-id ID] [--no-wait] -- [raysft overrides...]
#
#   launch/submit.sh -- recipe=smollm3_sft
#   launch/submit.sh --address http://127.0.0.1:8265 -- trainer.max_steps=10 'monitor.sample_prompts=["What is 2 + 2?"]'
#
# The overrides reach `python -m raysft` on the cluster exactly as given here (quote them as you would
# for `raysft`). The job runs this checkout (working_dir = the project root) with
# launch/runtime_env.yaml, plus the variables named in FORWARD_ENV (and $RAYSFT_FORWARD_ENV) that
# are set in your shell. FORWARD_ENV holds no credential: Ray keeps a job's runtime_env for anyone
# who can list jobs (README "Credentials on a cluster"); tokens and keys come from the nodes. Naming
# one in RAYSFT_FORWARD_ENV sends it anyway, with a warning.
#
#   --address ADDR        the cluster's job server (dashboard) address. Default: $RAY_API_SERVER_ADDRESS,
#                         else $RAY_ADDRESS, else http://127.0.0.1:8265 (`ray dashboard cluster.yaml`
#                         forwards that port to the head).
#   --submission-id ID    the job's id (default raysft-<date>-<time>-<random>): `ray job logs -f ID`,
#                         `ray job stop ID`.
#   --no-wait             submit and return at once (exit 0 once the job is accepted).
#
# Auth: Ray 2.60 clusters use token auth. RAY_AUTH_MODE is passed through untouched: set
# RAY_AUTH_MODE=token (token in ~/.ray/auth_token, or $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH) for
# such a cluster, RAY_AUTH_MODE=disabled for one started with auth disabled.
#
# Exit status: 0 when the job succeeded; the driver's exit code when it failed (2: bad config or
# override, 1: anything else); 1 when it was stopped; 130 when you interrupt the log stream (the
# job keeps running on the cluster).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
# Forwarded from your shell when set: endpoints, regions and project names, no credential. S3 access
# comes from the nodes' IAM instance profile, WANDB_API_KEY / HF_TOKEN from the nodes' environment
# (README "Credentials on a cluster"). RAYSFT_FORWARD_ENV="WANDB_API_KEY HF_TOKEN" forwards them
# anyway, recorded by Ray with the job.
FORWARD_ENV="WANDB_ENTITY WANDB_PROJECT WANDB_BASE_URL HF_HUB_OFFLINE HF_ENDPOINT
TRACKIO_SPACE_ID TRACKIO_DATASET_ID RAYSFT_BUCKET AWS_ENDPOINT_URL AWS_DEFAULT_REGION AWS_REGION"

usage() { sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
SUBMISSION_ID="raysft-$(date +%Y%m%d-%H%M%S)-$RANDOM"
NO_WAIT=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) ADDRESS="${2:?--address needs a value}"; shift 2 ;;
    --address=*) ADDRESS="${1#*=}"; shift ;;
    --submission-id) SUBMISSION_ID="${2:?--submission-id needs a value}"; shift 2 ;;
    --submission-id=*) SUBMISSION_ID="${1#*=}"; shift ;;
    --no-wait) NO_WAIT=(--no-wait); shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "submit.sh: unknown option $1 (raysft overrides go after --)" >&2; exit 2 ;;
    *) break ;;
  esac
done

# The runtime env: launch/runtime_env.yaml + the forwarded variables, in a private temp file (not on
# the command line, where `ps` would show the secrets).
RUNTIME_ENV="$(mktemp "${TMPDIR:-/tmp}/raysft-runtime-env.XXXXXX")"
trap 'rm -f "$RUNTIME_ENV"' EXIT
chmod 600 "$RUNTIME_ENV"
FORWARD="$FORWARD_ENV ${RAYSFT_FORWARD_ENV:-}" "$PYTHON" - "$HERE/runtime_env.yaml" "$RUNTIME_ENV" <<'PY'
import json, os, re, sys

import yaml

with open(sys.argv[1]) as f:
    env = yaml.safe_load(f) or {}
names = [n for n in os.environ["FORWARD"].split() if os.environ.get(n)]
env.setdefault("env_vars", {}).update({n: os.environ[n] for n in names})
with open(sys.argv[2], "w") as f:
    json.dump(env, f)  # JSON is YAML: `ray job submit --runtime-env` reads it
if names:
    print(f"submit.sh: forwarding {' '.join(names)} to the job", file=sys.stderr)
secret = [n for n in names if re.search(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", n)]  # raysft SECRET_ENV
if secret:
    print(f"submit.sh: warning: {' '.join(secret)} will be stored with the job: Ray keeps the job's runtime_env "
          "in its job table (ray job list, the dashboard's Jobs API) for anyone holding the cluster's token; "
          "prefer the nodes' environment (README \"Credentials on a cluster\")", file=sys.stderr)
PY

echo "submit.sh: job $SUBMISSION_ID -> $ADDRESS" >&2
trap 'echo; echo "submit.sh: stopped following job $SUBMISSION_ID; it keeps running on the cluster:" \
  "ray job logs -f $SUBMISSION_ID / ray job stop $SUBMISSION_ID (--address $ADDRESS)" >&2; exit 130' INT

set +e
ray job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" --runtime-env "$RUNTIME_ENV" \
  --working-dir "$ROOT" "${NO_WAIT[@]}" -- python -m raysft "$@"
rc=$?
set -e
if [[ ${#NO_WAIT[@]} -gt 0 || $rc -ne 0 && $rc -ne 1 ]]; then
  exit $rc  # --no-wait, or the submission itself failed (no job to ask about)
fi

# `ray job submit` exits 0 for a stopped job and 1 for any failure: ask for the real outcome.
ADDRESS="$ADDRESS" SUBMISSION_ID="$SUBMISSION_ID" "$PYTHON" - <<'PY'
import os, sys

from ray.job_submission import JobStatus, JobSubmissionClient

try:
    info = JobSubmissionClient(os.environ["ADDRESS"]).get_job_info(os.environ["SUBMISSION_ID"])
except Exception as e:  # the submission itself failed: ray job submit printed why
    print(f"submit.sh: no job {os.environ['SUBMISSION_ID']} at {os.environ['ADDRESS']}: {type(e).__name__}", file=sys.stderr)
    sys.exit(1)
if info.status == JobStatus.SUCCEEDED:
    sys.exit(0)
if info.status == JobStatus.FAILED:
    code = info.driver_exit_code
    first_line = (info.message or "").splitlines()[0] if info.message else ""
    print(f"submit.sh: job {info.submission_id} failed (driver exit code {code}): {first_line}", file=sys.stderr)
    sys.exit(code if isinstance(code, int) and 0 < code < 256 else 1)
print(f"submit.sh: job {info.submission_id} is {info.status}: {info.message}", file=sys.stderr)
sys.exit(1)
PY
