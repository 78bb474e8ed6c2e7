#!/usr/bin/env bash
# Screenshot a quickstart report in a real browser (headless Chromium), to look at it as a user would:
#   scripts/report_screenshot.sh quickstart/report.html report.png [width] [height]
# Needs Debian's chromium (apt-get install chromium). The flags keep Chromium off the network.
set -euo pipefail
html=$(realpath "$1"); out=$2; w=${3:-1200}; h=${4:-3000}
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
  --window-size="$w,$h" --screenshot="$(realpath -m "$out")" "file://$html" 2>/dev/null
echo "wrote $out"
