#!/usr/bin/env bash
# Stop the CI cluster: cancel what is still queued, then stop exactly the daemons that
# slurm-up.sh started (by the pids it recorded), in reverse order. Idempotent.
set -uo pipefail
start=$SECONDS
STATE=/run/slurm-ci
[ -d "$STATE" ] || { echo "slurm down in 0 s (nothing was up)"; exit 0; }

gone() {  # gone PID: no such process, or a zombie
  [ -r "/proc/$1/stat" ] || return 0
  [ "$(awk '{print $3}' "/proc/$1/stat")" = Z ]
}

if command -v scancel >/dev/null && [ -f "$STATE/slurmctld.pid" ]; then
  scancel --user=root 2>/dev/null || true
fi
for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
  file="$STATE/$daemon.pid"
  [ -f "$file" ] || continue
  pid=$(cat "$file")
  if ! gone "$pid" && grep -q "$daemon" "/proc/$pid/cmdline" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 100); do gone "$pid" && break; sleep 0.1; done
    gone "$pid" || kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$file"
done
echo "slurm down in $((SECONDS - start)) s"
