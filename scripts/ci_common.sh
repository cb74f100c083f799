# Sourced by the CI legs (scripts/ci_newest_torch.sh, scripts/ci_sanitizers.sh) from the
# repository root, after `set -euo pipefail`:
#
#   ROOT, T0                 the checkout and the leg's start time
#   ci_leg NAME              removes $WORK at exit (kept with FASTSYNTH_KEEP=1) and reports a
#                            failure as "== NAME leg FAILED (rc=...) after ...s"
#   stamp MESSAGE            prints "== [elapsed s] MESSAGE"
#   copy_checkout            copies the checkout's tracked and untracked, not ignored files to
#                            $WORK/src (the checkout's own build is left alone)

ROOT=$(pwd)
T0=$(date +%s)
KEEP=${FASTSYNTH_KEEP:-0}

ci_leg() {
  CI_LEG=$1
  trap ci_cleanup EXIT
}

ci_cleanup() {
  local rc=$?
  if [ "$KEEP" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
  if [ $rc != 0 ]; then echo "== $CI_LEG leg FAILED (rc=$rc) after $(( $(date +%s) - T0 ))s" >&2; fi
  exit $rc
}

stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }

copy_checkout() {
  stamp "copy the checkout (tracked and untracked, not ignored files) to $WORK/src"
  mkdir -p "$WORK/src"
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _) \
    | tar -C "$ROOT" --null -T - -cf - | tar -C "$WORK/src" -xf -
}
