#!/usr/bin/env bash
# Runs plugvisor's fuzz targets for a while each — by hand or from CI:
#
#   fuzz/run.sh                 # every target, 30 s each
#   fuzz/run.sh manifest 600    # one target, 10 minutes
#
# Needs the nightly toolchain and cargo-fuzz (`cargo xtask setup` installs
# it). The corpus grows in fuzz/corpus/<target> (not committed); the seeds
# in fuzz/seeds/<target> and the dictionaries in fuzz/dicts/<target>.dict
# are. A crash leaves its input in
# fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

target="${1:-all}"
seconds="${2:-30}"

if [[ "$target" == all ]]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
else
    targets=("$target")
fi

for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    seeds=()
    if [[ -d "fuzz/seeds/$t" ]]; then
        seeds=("fuzz/seeds/$t")
    fi
    dict=()
    if [[ -f "fuzz/dicts/$t.dict" ]]; then
        dict=(-dict="fuzz/dicts/$t.dict")
    fi
    echo "==> fuzz $t for ${seconds}s"
    cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 "${dict[@]}"
done
