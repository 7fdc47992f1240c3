#!/usr/bin/env bash
# Debian packages the test suite runs for real: Chromium (the report in a headless browser),
# slurm-wlm, slurm-client and munge (a real Slurm, one node or two simulated ones), iproute2 (the
# simulated nodes' networks), DCMTK (the JPEG encoders that write
# the transfer-syntax tests' files: pydicom encodes no JPEG process). Installs only what is missing;
# needs root (or sudo). Nothing here is needed to run the workflow itself.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-dejavu-core)
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
command -v dcmcjpeg >/dev/null 2>&1 || need+=(dcmtk)
command -v ip >/dev/null 2>&1 || need+=(iproute2)  # the two simulated nodes' network namespaces
[ ${#need[@]} -eq 0 ] && exit 0
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
echo "installing Debian packages: ${need[*]}"
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
