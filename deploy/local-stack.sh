#!/bin/sh
# Local Ray head + S3-compatible server (moto) + MLflow server, for a machine without
# Kubernetes. Same as `dino stack up|down`. Usage:
#   deploy/local-stack.sh up [--state-dir DIR] [--no-ray] [--no-s3] [--no-mlflow]
#   eval "$(deploy/local-stack.sh env)"   # export the addresses into this shell
#   deploy/local-stack.sh down [--state-dir DIR]
# The state dir (default ./.dino-stack) records the pids that `down` stops.
set -eu
if [ "$#" -lt 1 ]; then
    echo "usage: $0 up|down|env [--state-dir DIR] [--no-ray] [--no-s3] [--no-mlflow]" >&2
    exit 2
fi
command="$1"
shift
exec "${PYTHON:-python}" -m service.devtools.stack "$command" --state-dir ./.dino-stack "$@"
