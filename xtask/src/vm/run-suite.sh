#!/mesh/bb/sh
# mesh VM suite, guest side, on the suite's disk: runs each test binary listed in /mesh/plan
# (`NAME PATH` lines) as root with the arguments in /mesh/args (one per line), one test thread,
# and reports on the second serial port (ttyS1) between markers that `cargo xtask vm-test` parses:
#   MESH-VM: BEGIN NAME / the test runner's own output / MESH-VM: END NAME rc=N / MESH-VM: DONE
# and `MESH-VM: SKIP NAME reason` for a binary not started because the time budget was spent,
# `MESH-VM: CUT NAME reason` before the END of one stopped at the budget's end.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/mesh/bb
# Backtraces for panics only: capturing one for every anyhow error is very slow under TCG.
export HOME=/root RUST_BACKTRACE=1 RUST_LIB_BACKTRACE=0 MESH_VM=1
# Emulation is many times slower: the tests' waits and I/O timeouts stretch by this factor.
export MESH_TEST_SLOWDOWN=15
R=/dev/ttyS1
say() {
    echo "MESH-VM: $*" > $R
    echo "mesh-vm: $*"
}
ip link set lo up
# The two virtio-net NICs joined back to back by qemu (MACs set by xtask) for tests/vm_nic.rs.
for dev in /sys/class/net/*; do
    case "$(cat "$dev/address")" in
        52:54:00:12:34:01) export MESH_VM_NIC_CLIENT="${dev##*/}" ;;
        52:54:00:12:34:02) export MESH_VM_NIC_NODE="${dev##*/}" ;;
    esac
done
say "BOOTED kernel=$(uname -r) cpus=$(nproc) nics=${MESH_VM_NIC_CLIENT:-none},${MESH_VM_NIC_NODE:-none}"
TIMEOUT=$(cat /mesh/timeout)
BUDGET=$(cat /mesh/budget)
GRACE=$(cat /mesh/grace)
set --
while IFS= read -r a; do set -- "$@" "$a"; done < /mesh/args
cd "$(cat /mesh/cwd)"
while read -r name path; do
    up=$(cut -d. -f1 /proc/uptime)
    limit=$TIMEOUT
    if [ "$BUDGET" -gt 0 ]; then
        if [ "$up" -ge "$BUDGET" ]; then
            say "SKIP $name the run's time budget of $BUDGET s was spent after $up s"
            continue
        fi
        # A binary started within the budget may finish within GRACE more seconds.
        left=$((BUDGET + GRACE - up))
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    say "BEGIN $name"
    timeout -s KILL "$limit" "$path" --test-threads=1 "$@" > $R 2>&1
    rc=$?
    if [ "$rc" -eq 137 ] && [ "$limit" -lt "$TIMEOUT" ]; then
        say "CUT $name stopped after $limit s, at the end of the run's time budget ($BUDGET + $GRACE s)"
    fi
    say "END $name rc=$rc"
done < /mesh/plan
say "DONE"
sync
/mesh/bb/busybox poweroff -f
