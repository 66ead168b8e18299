#!/bin/bash
# A local stand-in for debian:bookworm-slim, for machines that reach no image registry (make docker-test).
#
#   docker/make_base.sh [IMAGE]      default localhost/convmodel-base:bookworm; kept if it exists
#
# mmdebstrap builds a minimal bookworm from deb.debian.org (over http, as the registry's image would
# be) and `podman import` turns it into an image. This machine's CA bundle goes in as
# /usr/local/share/host-ca.crt with PIP_CERT pointing at it: where PyPI is reachable only through an
# intercepting proxy, pip inside the build needs that bundle. It lives in this base only, never in
# the shipped Dockerfiles, and apt's ca-certificates (which rewrites /etc/ssl/certs) does not touch it.
set -euo pipefail
IMAGE=${1:-localhost/convmodel-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

if podman image exists "$IMAGE"; then
    echo "base image $IMAGE exists (podman rmi $IMAGE to rebuild it)"
    exit 0
fi
for tool in mmdebstrap podman; do
    command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install $tool)" >&2; exit 1; }
done
[ -r "$CA_BUNDLE" ] || { echo "error: CA bundle $CA_BUNDLE is not readable (set CA_BUNDLE=FILE)" >&2; exit 1; }

# what debian:bookworm-slim leaves out: manuals, documentation (copyright files stay), translations
mmdebstrap --variant=minbase \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="cp '$CA_BUNDLE' \"\$1/usr/local/share/host-ca.crt\"" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm - "$MIRROR" \
    | podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/usr/local/share/host-ca.crt' --change 'CMD ["/bin/bash"]' - "$IMAGE"
echo "base image $IMAGE made"
