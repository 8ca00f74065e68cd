#!/usr/bin/env bash
# Render a kustomization of infra/k8s to standard output.
#
#   infra/k8s/render.sh [DIR]        DIR defaults to infra/k8s/overlays/local
#   infra/k8s/render.sh --kustomize  print the path of a kustomize binary (installing it if needed)
#
# kustomize comes from $RECSTACK_KUSTOMIZE, else the cache ~/.cache/recstack/bin, else PATH; when
# none is there it is installed into the cache with `go install` (Go from PATH or /usr/local/go),
# once, in about a minute. Without kustomize, Go or network, DIR is rendered by render.py (next to
# this script): a small Python renderer of the same files that tests/unit/test_k8s.py keeps in
# step with kustomize. RECSTACK_KUSTOMIZE_INSTALL=0 never installs (offline machines).
set -euo pipefail

KUSTOMIZE_VERSION=v5.8.1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin_dir=${RECSTACK_BIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/recstack/bin}

log() { echo "render.sh: $*" >&2; }

find_kustomize() {
    local candidate
    for candidate in "${RECSTACK_KUSTOMIZE:-}" "$bin_dir/kustomize" "$(command -v kustomize || true)"; do
        if [[ -n $candidate && -x $candidate ]]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

install_kustomize() {
    local go
    if [[ ${RECSTACK_KUSTOMIZE_INSTALL:-1} == 0 ]]; then
        return 1
    fi
    go=$(command -v go || true)
    if [[ -z $go && -x /usr/local/go/bin/go ]]; then
        go=/usr/local/go/bin/go
    fi
    if [[ -z $go ]]; then
        log "no Go toolchain to install kustomize with"
        return 1
    fi
    mkdir -p "$bin_dir"
    # One installer at a time (parallel test runs share the cache); the others wait and reuse it.
    exec 9>"$bin_dir/.kustomize.lock"
    if command -v flock >/dev/null; then
        flock 9
    fi
    if [[ ! -x $bin_dir/kustomize ]]; then
        log "installing kustomize $KUSTOMIZE_VERSION into $bin_dir (go install, about a minute)"
        if ! GOBIN=$bin_dir "$go" install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" >&2; then
            log "go install of kustomize failed"
            return 1
        fi
    fi
    echo "$bin_dir/kustomize"
}

case "${1:-}" in
    -h | --help)
        sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    --kustomize)
        find_kustomize || install_kustomize
        exit
        ;;
esac

target=${1:-$here/overlays/local}
if kustomize=$(find_kustomize || install_kustomize); then
    exec "$kustomize" build "$target"
fi
python=$here/../../.venv/bin/python
[[ -x $python ]] || python=python3
log "kustomize is not available: rendering $target with render.py"
exec "$python" "$here/render.py" "$target"
