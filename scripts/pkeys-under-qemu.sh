#!/usr/bin/env bash
# pkeys-under-qemu.sh: run the protection-key (PKU) path of the language
# backend for real on a host whose CPU has no PKU, inside a QEMU guest whose
# emulated CPU (TCG, `-cpu max`) has it.
#
# A developer tool, not part of CI. Debian bookworm host, run as root from
# anywhere in the repository:
#
#     scripts/pkeys-under-qemu.sh            # everything below
#     MFQ_TESTS="gate pkeys" scripts/pkeys-under-qemu.sh   # a subset
#
# What it does (idempotent; every step is skipped when already done):
#   1. apt: qemu-system-x86, busybox-static, cpio, xz-utils; adds
#      bookworm-backports (priority 100: nothing on the host upgrades from
#      it) and downloads — does not install — its 6.12 kernel: the
#      runtime's signal handling relies on 6.12's signal frames under a
#      restricted PKRU (see lang-isolation/src/runtime/pkeys.rs).
#   2. cargo: builds the test binaries (`hostile`, `pkeys_gate`, the
#      lang-isolation unit tests, `pkeys_bench` in release) and runs the
#      pkeys tests once on the host, which fills the builder caches the guest
#      then hits (a cache hit still runs `cargo metadata`, so the guest sees
#      the host's toolchain).
#   3. An initramfs: busybox, the 9p/overlay modules of that kernel, an init
#      that mounts the host's / read-only over virtio-9p, puts a tmpfs
#      overlay on top (the guest writes, the host never sees it) and runs the
#      test binaries in a chroot of it — the host's userspace, toolchain and
#      build outputs at their own paths.
#   4. Boots it (`-cpu max -smp 2 -m 4G`, no KVM), checks the guest CPU
#      shows `pku ospke`, runs each selected group, prints each group's
#      result and log tail and exits non-zero if any failed (or the guest
#      did not report).
#
# Groups (MFQ_TESTS, default all): cpu (PKU visible), gate (pkeys_gate),
# unit (lang-isolation unit tests named pkeys), pkeys (hostile pkeys::,
# with the pkeys_state check), bench (pkeys_bench), language (hostile
# language::, which includes the sandbox checks: hostile/sandbox.rs holds
# helpers only), tenants (hostile tenants::language).
# Times under TCG are emulation times, not the hardware cost of WRPKRU.
#
# Environment: MFQ_WORK (default /var/tmp/microfaas-pkeys-qemu) holds the
# kernel, initramfs and results; MFQ_TIMEOUT guest wall-clock limit in
# seconds (default 3600); MFQ_SMP / MFQ_MEM (2 / 4G); MFQ_CACHES_FILLED=1
# skips the host runs of step 2 (when a previous run filled the caches).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${MFQ_WORK:-/var/tmp/microfaas-pkeys-qemu}
TESTS=${MFQ_TESTS:-cpu gate unit pkeys bench language tenants}
TIMEOUT=${MFQ_TIMEOUT:-3600}
SMP=${MFQ_SMP:-2}
MEM=${MFQ_MEM:-4G}
KPKG=linux-image-6.12.95+deb12-amd64-unsigned

log() { printf '\n== %s\n' "$*" >&2; }

# --- 1. packages and the guest kernel -------------------------------------
need=()
for p in qemu-system-x86 busybox-static cpio xz-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi
mkdir -p "$WORK"
if ! ls "$WORK"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
    bp=/etc/apt/sources.list.d/bookworm-backports.sources
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports (for a 6.12 kernel)"
        cat >"$bp" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        apt-get update -qq
    fi
    log "downloading $KPKG (not installed on the host)"
    rm -rf "$WORK/kernel" "$WORK"/linux-image-*.deb
    (cd "$WORK" && apt-get download "$KPKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    dpkg-deb -x "$WORK"/linux-image-*.deb "$WORK/kernel"
fi
VMLINUZ=$(ls "$WORK"/kernel/boot/vmlinuz-* | head -n1)
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR="$WORK/kernel/lib/modules/$KVER/kernel"

# --- 2. test binaries and builder caches ----------------------------------
cd "$REPO"
exe_of() { # the test executable cargo reports for "$1" in its output on stdin
    sed -n "s|.*Executable $1 (\(.*\))|\1|p" | head -n1
}
log "building test binaries (host)"
HOSTILE=$REPO/$(cargo test --test hostile --no-run 2>&1 | tee /dev/stderr | exe_of tests/hostile/main.rs)
LIBOUT=$(cargo test -p lang-isolation --no-run 2>&1 | tee /dev/stderr)
GATE=$REPO/$(echo "$LIBOUT" | exe_of tests/pkeys_gate.rs)
UNIT=$REPO/$(echo "$LIBOUT" | exe_of 'unittests src/lib.rs')
cargo build --release -p lang-isolation --example pkeys_bench
BENCH=$REPO/target/release/examples/pkeys_bench
for f in "$HOSTILE" "$GATE" "$UNIT" "$BENCH"; do [ -x "$f" ] || { echo "missing $f" >&2; exit 1; }; done
if [ "${MFQ_CACHES_FILLED:-0}" != 1 ]; then
    log "filling the builder caches (host runs, PKU unavailable here)"
    cargo test --test hostile -- pkeys:: language:: tenants::language >/dev/null 2>&1 ||
        echo "(some host runs failed; the guest runs them anyway)" >&2
    cargo test -p lang-isolation --test pkeys_gate >/dev/null 2>&1 || true
    "$BENCH" 1000 >/dev/null 2>&1 || true
fi

# --- 3. initramfs -----------------------------------------------------------
log "initramfs for $KVER"
IR="$WORK/initramfs"
rm -rf "$IR" "$WORK/out"
mkdir -p "$IR"/{bin,mods,proc,sys,dev,lower,upper,newroot} "$WORK/out"
cp /bin/busybox "$IR/bin/busybox"
for m in fs/netfs/netfs net/9p/9pnet net/9p/9pnet_virtio fs/9p/9p fs/overlayfs/overlay; do
    xz -dc "$MODDIR/$m.ko.xz" >"$IR/mods/${m##*/}.ko"
done
# The script the guest runs in the chroot (the host's /, so its paths hold).
cat >"$WORK/guest-run.sh" <<EOF
#!/bin/bash
# Generated by scripts/pkeys-under-qemu.sh; runs inside the guest.
export HOME=/root PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export RUST_BACKTRACE=1 MICROFAAS_GUEST=qemu-tcg-pku
OUT=/mfq-out
group() { # name dir cmd...: runs one group, its log and exit status to OUT
    local name=\$1 dir=\$2; shift 2
    case " $TESTS " in *" \$name "*) ;; *) return 0;; esac
    echo "MFQ-START \$name \$(date -u +%T)"
    (cd "\$dir" && "\$@") >"\$OUT/\$name.log" 2>&1
    local rc=\$?
    echo \$rc >"\$OUT/\$name.rc"
    echo "MFQ-END \$name rc=\$rc \$(date -u +%T)"
    tail -n 4 "\$OUT/\$name.log"
}
cpu() {
    uname -r
    grep -m1 -o -w -e pku -e ospke /proc/cpuinfo | sort -u | tr '\n' ' '; echo
    grep -qw ospke /proc/cpuinfo && grep -qw pku /proc/cpuinfo
}
group cpu / cpu
group gate $REPO/lang-isolation $GATE
group unit $REPO/lang-isolation $UNIT --test-threads=1 pkeys
group pkeys $REPO $HOSTILE --test-threads=1 pkeys:: --nocapture
group bench $REPO/lang-isolation $BENCH 20000
group language $REPO $HOSTILE --test-threads=1 language::
group tenants $REPO $HOSTILE --test-threads=1 tenants::language
echo MFQ-DONE
EOF
chmod +x "$WORK/guest-run.sh"
cat >"$IR/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in netfs 9pnet 9pnet_virtio 9p overlay; do insmod /mods/\$m.ko || echo "insmod \$m failed"; done
o=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o ro,cache=loose,\$o hostroot /lower || echo "MFQ-FAIL mounting the host root"
mount -t tmpfs -o size=3g upper /upper; mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot || echo "MFQ-FAIL overlay"
R=/newroot
mount -t proc proc \$R/proc; mount -t sysfs sys \$R/sys; mount -t devtmpfs dev \$R/dev
mkdir -p \$R/dev/pts \$R/dev/shm \$R/mfq-out
mount -t devpts devpts \$R/dev/pts; mount -t tmpfs shm \$R/dev/shm
mount -t cgroup2 cgroup2 \$R/sys/fs/cgroup 2>/dev/null
mount -t 9p -o \$o mfqout \$R/mfq-out || echo "MFQ-FAIL mounting the results share"
ifconfig lo 127.0.0.1 up 2>/dev/null
chroot \$R $WORK/guest-run.sh
sync
echo o >/proc/sysrq-trigger
sleep 10
EOF
chmod +x "$IR/init"
(cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initramfs.gz"

# --- 4. boot -----------------------------------------------------------------
log "booting $KVER under TCG (-cpu max); serial log: $WORK/console.log"
set +e
timeout "$TIMEOUT" qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu max -smp "$SMP" -m "$MEM" \
    -nographic -serial mon:stdio -no-reboot \
    -kernel "$VMLINUZ" -initrd "$WORK/initramfs.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 rdinit=/init" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$WORK/out,mount_tag=mfqout,security_model=none,multidevs=remap" \
    </dev/null 2>&1 | tee "$WORK/console.log"
set -e

# --- results -------------------------------------------------------------------
log "results"
fail=0
grep -q MFQ-DONE "$WORK/console.log" || { echo "the guest did not finish (timeout or crash)"; fail=1; }
grep -q MFQ-FAIL "$WORK/console.log" && { grep MFQ-FAIL "$WORK/console.log"; fail=1; }
for g in $TESTS; do
    rc=$(cat "$WORK/out/$g.rc" 2>/dev/null || echo missing)
    printf '%-10s %s\n' "$g" "$( [ "$rc" = 0 ] && echo PASS || echo "FAIL (rc $rc)")"
    [ "$rc" = 0 ] || fail=1
done
if grep -qs 'pkeys_state' "$WORK/out/pkeys.log"; then
    grep -h 'pkeys_state' "$WORK/out/pkeys.log" | head -n 3
fi
echo "logs: $WORK/out/*.log"
exit $fail
