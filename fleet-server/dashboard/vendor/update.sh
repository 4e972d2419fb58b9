#!/usr/bin/env bash
# Refreshes the vendored uPlot (MIT; LICENSE-uPlot) from the npm registry. The dashboard uses its
# prebuilt IIFE bundle and stylesheet as they are: no bundler, nothing built at run time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version="${1:-1.6.32}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack "uplot@$version" >/dev/null && tar xzf "uplot-$version.tgz")
cp "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" "$here/"
cp "$work/package/LICENSE" "$here/LICENSE-uPlot"
echo "uPlot $version vendored into $here"
