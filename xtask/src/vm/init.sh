#!/bin/busybox sh
# mesh VM suite, guest side: the initramfs's /init (PID 1).
# Loads the modules listed in /modules/order, mounts the suite's disk (/dev/vda, ext4, written by
# `cargo xtask vm-test`; qemu keeps its writes in a throwaway snapshot) as the root, gives it
# /proc, /sys, /dev, bpffs, cgroup2 and tmpfs scratch areas, then switches to it and runs
# /mesh/run-suite there. Results go to the second serial port (ttyS1); this console (ttyS0) is the
# log. A boot with `mesh.probe` on the command line only reports that it got here (KVM probe).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "mesh-vm: init on $(uname -r), $(nproc) CPUs"
if grep -q mesh.probe /proc/cmdline; then
    echo "MESH-VM-PROBE-OK"
    poweroff -f
fi
for m in $(cat /modules/order); do
    insmod "/modules/$m" || echo "mesh-vm: insmod $m failed"
done
fail() {
    echo "MESH-VM: FATAL $*" > /dev/ttyS1
    echo "mesh-vm: FATAL $*"
    poweroff -f
}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || fail "no /dev/vda (virtio_blk)"
mount -t ext4 /dev/vda /newroot || fail "cannot mount /dev/vda"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t bpf bpf /newroot/sys/fs/bpf || fail "cannot mount bpffs"
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup || echo "mesh-vm: no cgroup2"
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null
for d in tmp run var/tmp; do
    # A repository cloned under /tmp (as CI does) was staged there on the disk: keep it visible
    # (the disk is a copy-on-write snapshot, so writable) instead of hiding it under a tmpfs.
    if [ -n "$(ls -A "/newroot/$d" 2>/dev/null)" ]; then
        echo "mesh-vm: /$d holds the suite's files: no tmpfs on it"
        continue
    fi
    mount -t tmpfs -o mode=1777 tmpfs "/newroot/$d" || fail "cannot mount tmpfs on /$d"
done
exec switch_root /newroot /mesh/run-suite
