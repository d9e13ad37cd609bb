#!/usr/bin/env bash
# The stand-in agent's trial entrypoint (installed as /run/determined/train/entrypoint.sh).
#
# It takes the steps a Determined 0.38.1 trial container takes, in the same order, with the
# harness's own modules (master/static/srv/entrypoint.sh and task-setup.sh upstream):
#   1. the container's stdout/stderr under /run/determined/train/logs (wrap_rank redirects each
#      rank's output there), DET_PYTHON_EXECUTABLE defaulting to python3;
#   2. determined.exec.prep_container: writes /run/determined/info/{cluster,trial}.json from the
#      DET_* variables, downloads the context directory from the master into the working
#      directory, writes resources.json and reports the accelerators;
#   3. the context's startup-hook.sh, sourced;
#   4. prep_container --rendezvous (the master's rendezvous API -> rendezvous.json);
#   5. determined.exec.launch, which runs the experiment's entrypoint.
STDOUT_FILE=/run/determined/train/logs/stdout.log
STDERR_FILE=/run/determined/train/logs/stderr.log
mkdir -p "$(dirname "$STDOUT_FILE")"
ln -sf /proc/$$/fd/1 "$STDOUT_FILE"
ln -sf /proc/$$/fd/2 "$STDERR_FILE"
export DET_PYTHON_EXECUTABLE="${DET_PYTHON_EXECUTABLE:-python3}"

set -e

"$DET_PYTHON_EXECUTABLE" -m determined.exec.prep_container --download_context_directory --resources --proxy

set -x
test -f startup-hook.sh && source startup-hook.sh
set +x

"$DET_PYTHON_EXECUTABLE" -m determined.exec.prep_container --rendezvous

exec "$DET_PYTHON_EXECUTABLE" -m determined.exec.launch "$@"
