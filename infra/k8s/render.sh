#!/usr/bin/env bash
# Render a kustomization of infra/k8s to standard output, with the pinned kustomize.
#
#   infra/k8s/render.sh [DIR]        DIR defaults to infra/k8s/overlays/local
#   infra/k8s/render.sh --kustomize  print the path of the pinned kustomize (installing it if needed)
#
# kustomize comes from $RECSTACK_KUSTOMIZE, else the cache ~/.cache/recstack/bin/kustomize-VERSION,
# else a kustomize on PATH that reports the pinned version; when none is there it is built into
# the cache with `go install` (Go from PATH or /usr/local/go), once, in two to three minutes.
# `make test` does that first (infra/tools.sh). Without kustomize this script fails: the tests and
# the docs render with the real kustomize only.
set -euo pipefail

# v5.8.x needs a newer Go than this project's machines have; v5.7.1 builds with them.
KUSTOMIZE_VERSION=v5.7.1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin_dir=${RECSTACK_BIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/recstack/bin}
cached=$bin_dir/kustomize-$KUSTOMIZE_VERSION

log() { echo "render.sh: $*" >&2; }

find_kustomize() {
    local on_path
    if [[ -n ${RECSTACK_KUSTOMIZE:-} ]]; then
        echo "$RECSTACK_KUSTOMIZE"
        return 0
    fi
    if [[ -x $cached ]]; then
        echo "$cached"
        return 0
    fi
    on_path=$(command -v kustomize || true)
    if [[ -n $on_path && $("$on_path" version 2>/dev/null) == "$KUSTOMIZE_VERSION" ]]; then
        echo "$on_path"
        return 0
    fi
    return 1
}

install_kustomize() {
    local go tmp
    go=$(command -v go || true)
    if [[ -z $go && -x /usr/local/go/bin/go ]]; then
        go=/usr/local/go/bin/go
    fi
    if [[ -z $go ]]; then
        log "kustomize $KUSTOMIZE_VERSION is not installed and there is no Go toolchain to build it with"
        return 1
    fi
    mkdir -p "$bin_dir"
    # One installer at a time (parallel test runs share the cache); the others wait and reuse it.
    exec 9>"$bin_dir/.kustomize.lock"
    if command -v flock >/dev/null; then
        flock 9
    fi
    if [[ ! -x $cached ]]; then
        log "installing kustomize $KUSTOMIZE_VERSION into $bin_dir (go install, two to three minutes)"
        tmp=$(mktemp -d "$bin_dir/.kustomize.XXXXXX")
        if ! GOBIN=$tmp "$go" install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" >&2; then
            rm -rf "$tmp"
            log "go install of kustomize $KUSTOMIZE_VERSION failed"
            return 1
        fi
        mv "$tmp/kustomize" "$cached" # atomic: a reader never sees half a binary
        rm -rf "$tmp"
    fi
    echo "$cached"
}

if [[ -n ${RECSTACK_KUSTOMIZE:-} && ! -x $RECSTACK_KUSTOMIZE ]]; then
    log "RECSTACK_KUSTOMIZE=$RECSTACK_KUSTOMIZE is not an executable file"
    exit 1
fi

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
kustomize=$(find_kustomize || install_kustomize)
exec "$kustomize" build "$target"
