#!/usr/bin/env bash
# Create (or update, --overwrite) seqvision's two Prefect work pools on the server PREFECT_API_URL names:
#
#   seqvision-process  a process pool: flow runs are subprocesses on the machine that runs its worker
#                      (a workstation with a checkout of this repository);
#   seqvision-k8s      a kubernetes pool: each flow run is a Kubernetes Job whose pod requests
#                      `gpu_count` GPUs (deploy/k8s-base-job-template.json, committed so it is reviewed
#                      like code; edit it there, then rerun this script).
#
# Creating the kubernetes pool needs only prefect; the worker that serves it needs prefect-kubernetes.
# Usage: PREFECT_API_URL=http://127.0.0.1:4200/api deploy/create-pools.sh   (docs/cluster.md)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# Without an API URL (in the environment or the active profile) the CLI would create the pools on a
# throw-away temporary server, and report success.
if [[ -z "${PREFECT_API_URL:-}" ]] && ! grep -q '^PREFECT_API_URL=' <<<"$(prefect config view 2>/dev/null)"; then
  echo "error: set PREFECT_API_URL to your Prefect server (e.g. http://127.0.0.1:4200/api)" >&2
  exit 2
fi

prefect --no-prompt work-pool create seqvision-process --type process --overwrite
prefect --no-prompt work-pool create seqvision-k8s --type kubernetes --overwrite \
  --base-job-template "$here/k8s-base-job-template.json"
