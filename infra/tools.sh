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
#
# What is already there is not touched, so a second run takes a fraction of a second; apt-get
# update runs only when a package has to be installed. A tool that cannot be installed stops
# here with its name, rather than as a skipped or failing test later.
COMPONENT=tools
# shellcheck source=infra/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

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
