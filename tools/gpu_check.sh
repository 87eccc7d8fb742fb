#!/usr/bin/env bash
# One prepared check of jaxdp on a machine with an NVIDIA GPU; see tools/gpu_check.py.
#
#   tools/gpu_check.sh OUTDIR [--dry-run] [--wheels DIR]
#
# Without --dry-run it first installs this checkout over the preinstalled jax/flax/optax/orbax
# (pip install --no-deps: nothing else is touched) and, with --wheels, the missing pure-Python
# dependencies from that folder without a network (pip install --no-index --find-links DIR);
# docs/benchmarks.md says how to download them. Then every check runs, each recorded in
# OUTDIR/gpu_check.json (and OUTDIR/gpu_check.log), none stopping the others.
# --dry-run installs nothing and runs every check on the CPU at tiny sizes (CI runs it).
set -u
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: tools/gpu_check.sh OUTDIR [--dry-run] [--wheels DIR]" >&2
  exit 2
fi
out="$1"; shift
dry=""; wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry="--dry-run"; shift ;;
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1; use OUTDIR [--dry-run] [--wheels DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
log="$out/gpu_check.log"
python="${PYTHON:-python3}"
echo "===== gpu_check.sh $(date -u +%FT%TZ) on $(hostname): $here -> $out $dry" >> "$log"
if [ -z "$dry" ]; then
  # The modules jaxdp imports that a GPU image may lack; installed only if missing.
  missing=$("$python" - <<'PY'
import importlib.util
needed = {"grain": "grain", "ml_collections": "ml-collections", "tensorboardX": "tensorboardX",
          "array_record": "array-record", "tqdm": "tqdm", "absl": "absl-py",
          "tokenizers": "tokenizers", "matplotlib": "matplotlib"}
print(" ".join(pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None))
PY
)
  if [ -n "$missing" ]; then
    if [ -n "$wheels" ]; then
      echo "===== installing from $wheels: $missing" | tee -a "$log"
      "$python" -m pip install --no-index --find-links "$wheels" $missing >> "$log" 2>&1 \
        || echo "gpu_check.sh: pip could not install $missing from $wheels (see $log)" >&2
    else
      echo "gpu_check.sh: missing $missing and no --wheels DIR given; checks that import them will fail" >&2
    fi
  fi
  echo "===== pip install --no-deps $here" >> "$log"
  "$python" -m pip install --no-deps --no-build-isolation "$here" >> "$log" 2>&1 \
    || echo "gpu_check.sh: pip install --no-deps failed (see $log); running from the checkout" >&2
fi
exec "$python" "$here/tools/gpu_check.py" "$out" $dry
