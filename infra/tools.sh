#!/usr/bin/env bash
# Install the command-line tools the test suite needs, once per machine (`make test` runs this).
#
#   infra/tools.sh
#
#   openssl    the TLS test makes its certificate with it (Debian package openssl)
#   promtool   checks the Prometheus configuration, alert rules and their unit tests (Debian
#              package prometheus; its service is not started)
#   kustomize  renders infra/k8s at the version pinned in infra/k8s/render.sh (built with Go into
#              ~/.cache/recstack/bin, two to three minutes the first time)
#   grpcurl    calls the ranking server from the shell (README "Next steps"; its test runs the
#              README's command): GRPCURL_VERSION below, built with Go into the same folder
#              (about a minute the first time). `infra/tools.sh --grpcurl` prints its path.
#
# What is already there is not touched, so a second run takes a fraction of a second; apt-get
# update runs only when a package has to be installed. A tool that cannot be installed stops
# here with its name, rather than as a skipped or failing test later.
COMPONENT=tools
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GRPCURL_VERSION=v1.9.4
BIN_DIR=${RECSTACK_BIN_DIR:-$CACHE_ROOT/bin}
GRPCURL=$BIN_DIR/grpcurl-$GRPCURL_VERSION

# go_install MODULE@VERSION TARGET: build one Go command into TARGET, once (parallel runs share
# the cache: one builds, the others wait for it and reuse the binary).
go_install() {
    local module=$1 target=$2 go tmp
    go=$(command -v go || true)
    [[ -n $go || ! -x /usr/local/go/bin/go ]] || go=/usr/local/go/bin/go
    [[ -n $go ]] || die "no Go toolchain to build $module with"
    mkdir -p "$BIN_DIR"
    exec 9>"$BIN_DIR/.$(basename "$target").lock"
    ! command -v flock >/dev/null || flock 9
    if [[ ! -x $target ]]; then
        log "installing $module into $BIN_DIR (go install)"
        tmp=$(mktemp -d "$BIN_DIR/.go-install.XXXXXX")
        GOBIN=$tmp "$go" install "$module" >&2 || {
            rm -rf "$tmp"
            die "go install $module failed"
        }
        mv "$tmp"/* "$target" # atomic: a reader never sees half a binary
        rm -rf "$tmp"
    fi
    exec 9>&-
}

if [[ ${1:-} == --grpcurl ]]; then
    [[ -x $GRPCURL ]] || go_install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION" "$GRPCURL" >&2
    echo "$GRPCURL"
    exit 0
fi

packages=()
command -v openssl >/dev/null || packages+=(openssl)
command -v promtool >/dev/null || packages+=(prometheus)
if ((${#packages[@]} > 0)); then
    apt_install "${packages[@]}"
fi
for tool in openssl promtool; do
    command -v "$tool" >/dev/null || die "$tool is still missing after installing ${packages[*]}"
done

"$REPO_ROOT/infra/k8s/render.sh" --kustomize >/dev/null ||
    die "kustomize could not be installed (infra/k8s/render.sh --kustomize; it needs Go and the Go module proxy)"
[[ -x $GRPCURL ]] || go_install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION" "$GRPCURL"
