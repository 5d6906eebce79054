#!/bin/sh
# Builds avalon-caps with each planted bug and checks that the simulation
# catches it (the test fails with "seed N failed"). Exit status 0 only if
# every plant is caught. Run from anywhere: avalon-caps/check-plants.sh
set -u
cd "$(dirname "$0")/.." || exit 2
status=0
for plant in plant-keep-listing plant-grant-without-revoke plant-ack-before-flush; do
    out=$(nice -n 10 cargo test --release -p avalon-caps --features "$plant" --test sim 2>&1)
    caught=$(printf '%s\n' "$out" | grep -m1 -A1 'seed [0-9]* failed')
    if [ -n "$caught" ]; then
        printf '%s: caught\n%s\n' "$plant" "$caught"
    else
        printf '%s: NOT caught\n%s\n' "$plant" "$(printf '%s\n' "$out" | tail -n 20)"
        status=1
    fi
done
exit $status
