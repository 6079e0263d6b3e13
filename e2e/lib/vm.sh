# Shared by e2e/run-ipvs-vm and e2e/run-system: host packages, the Debian cloud kernel, the
# release build and the initramfs. Source it after setting E2E_DIR, REPO and CACHE, and a
# `die MESSAGE` that reports the failure in the caller's summary format.

e2e_log() { echo "e2e: $*" >&2; }

# e2e_install_packages PACKAGE...: installs the Debian packages that are missing.
e2e_install_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    e2e_log "installing ${missing[*]}"
    command -v apt-get >/dev/null || die "apt-get not found; cannot install ${missing[*]}"
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "could not install ${missing[*]}"
}

# The VM's host tools, checked after installing their packages.
e2e_vm_tools() {
    e2e_install_packages qemu-system-x86 busybox-static kmod cpio ipvsadm nftables iproute2 conntrack
    local tool
    for tool in qemu-system-x86_64 depmod cpio ipvsadm nft conntrack; do
        command -v "$tool" >/dev/null || die "$tool missing after installing its package"
    done
    [[ -x /bin/busybox ]] || die "/bin/busybox (busybox-static) missing"
}

# The one image package the cloud meta-package points at; downloading by a glob would fetch dozens.
_e2e_kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n 1
}

# Downloads and unpacks the kernel once; sets KPKG KVER MODDIR KBASE VMLINUZ.
e2e_kernel() {
    KPKG=$(_e2e_kernel_package)
    if [[ -z "$KPKG" ]]; then
        apt-get update -qq >&2 || die "apt-get update failed"
        KPKG=$(_e2e_kernel_package)
    fi
    [[ -n "$KPKG" ]] || die "no linux-image-*-cloud-amd64 package known to apt"
    local kroot="$CACHE/$KPKG"
    if [[ ! -f "$kroot/.unpacked" ]]; then
        e2e_log "downloading $KPKG"
        rm -rf "$kroot" && mkdir -p "$kroot/deb"
        (cd "$kroot/deb" && apt-get download -o APT::Sandbox::User=root "$KPKG" >&2) || die "apt-get download $KPKG failed"
        dpkg-deb -x "$kroot"/deb/*.deb "$kroot/root" || die "cannot unpack $KPKG"
        rm -rf "$kroot/deb"
        touch "$kroot/.unpacked"
    fi
    MODDIR=$( (ls -d "$kroot"/root/lib/modules/* "$kroot"/root/usr/lib/modules/* 2>/dev/null || true) | head -n 1)
    [[ -n "$MODDIR" ]] || die "$KPKG has no module tree"
    KVER=$(basename "$MODDIR")
    VMLINUZ="$kroot/root/boot/vmlinuz-$KVER"
    [[ -f "$VMLINUZ" ]] || die "$KPKG has no boot/vmlinuz-$KVER"
    # The .deb ships no modules.dep; depmod wants the tree under <base>/lib/modules.
    KBASE="$kroot/depmod"
    if [[ ! -f "$KBASE/lib/modules/$KVER/modules.dep" ]]; then
        mkdir -p "$KBASE/lib/modules"
        ln -sfn "$MODDIR" "$KBASE/lib/modules/$KVER"
        depmod -b "$KBASE" "$KVER" || die "depmod failed for $KVER"
    fi
}

# Builds the binary the VMs run (honours CARGO_TARGET_DIR); sets BIN. The functional suites
# take the dev profile: what they check is behaviour, not speed, and the hot core is optimized
# even there (the workspace's `[profile.dev.package]`). It is the very binary `cargo test
# --all-targets` builds for the integration tests, asked of cargo rather than guessed from a
# path: after the README's `cargo test` it costs nothing, where `cargo build` would build it
# again (the dev-dependencies change its features) and a release build would cost about 6 of
# CI's minutes. Benchmarks, and anyone who sets E2E_PROFILE=release, get the release binary.
e2e_binary() {
    case "${E2E_PROFILE:-dev}" in
        release) e2e_release_binary ;;
        dev)
            e2e_log "building the dev-profile binary (cargo test --all-targets --no-run)"
            local artifacts
            artifacts=$(cd "$REPO" && cargo test --locked --all-targets --no-run --message-format=json) \
                || die "cargo test --no-run failed"
            BIN=$(grep '"reason":"compiler-artifact"' <<< "$artifacts" | grep '"kind":\["bin"\]' \
                | grep '"name":"portpolicy"' | grep '"test":false' \
                | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
            [[ -n "$BIN" && -x "$BIN" ]] || die "cargo reported no portpolicy binary"
            ;;
        *) die "E2E_PROFILE must be dev or release, not ${E2E_PROFILE}" ;;
    esac
}

# Builds the release binary (honours CARGO_TARGET_DIR); sets BIN.
e2e_release_binary() {
    e2e_log "building the release binary"
    (cd "$REPO" && cargo build --release --bin portpolicy >&2) || die "cargo build --release failed"
    BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/portpolicy"
    [[ "$BIN" = /* ]] || BIN="$REPO/$BIN"
    [[ -x "$BIN" ]] || die "release binary not found at $BIN"
}

# Copies a dynamically linked program into $STAGE and every library ldd lists for it.
e2e_copy_program() {
    local src=$1 dest=$2 lib
    cp -L "$src" "$STAGE/$dest"
    for lib in $(ldd "$src" | grep -o '/[^ ]*'); do
        mkdir -p "$STAGE/$(dirname "$lib")"
        cp -Ln "$lib" "$STAGE/$lib"
    done
}

# What the agent's dataplane needs of the kernel: IPVS and the schedulers the tests use, the
# dummy interface and veth pairs, nftables with conntrack matches (`ct state`), and ctnetlink
# for the UDP conntrack cleanup. Both VM suites boot with exactly these (one list, so the two
# cannot drift apart), plus what each needs for itself.
E2E_DATAPLANE_MODULES=(ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh veth dummy nf_tables nft_masq nft_chain_nat
    nf_conntrack nft_ct nf_conntrack_netlink)

# e2e_stage_initramfs STAGE MODULE...: a fresh tree with busybox, portpolicy ($BIN), ipvsadm,
# nft, iproute2's ip (as `nsip`) and the named kernel modules with their dependencies. The
# guest's init loads the modules listed in /e2e/modules, in the order given here.
e2e_stage_initramfs() {
    STAGE=$1
    shift
    rm -rf "$STAGE"
    mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,e2e,lib/modules/"$KVER"}
    cp /bin/busybox "$STAGE/bin/busybox"
    ln -s busybox "$STAGE/bin/sh"
    e2e_copy_program "$BIN" bin/portpolicy
    e2e_copy_program "$(command -v ipvsadm)" sbin/ipvsadm
    e2e_copy_program "$(command -v nft)" sbin/nft
    # conntrack-tools checks what the agent deletes over ctnetlink.
    e2e_copy_program "$(command -v conntrack)" sbin/conntrack
    # Busybox's shell prefers its own `ip` applet, and iproute2 reads any name starting with `ip`
    # as a shortcut, so the real one is `nsip`.
    e2e_copy_program "$(command -v ip)" bin/nsip
    local module deps ko rel list="$STAGE.modules"
    : > "$list"
    for module in "$@"; do
        deps=$(modprobe -d "$KBASE" -S "$KVER" --show-depends "$module" 2>&1) \
            || die "module $module not found in $KPKG: $deps"
        awk '$1 == "insmod" { print $2 }' <<< "$deps" >> "$list"
    done
    sort -u -o "$list" "$list"
    printf '%s\n' "$@" > "$STAGE/e2e/modules"
    while read -r ko; do
        rel=${ko#"$KBASE/lib/modules/$KVER/"}
        mkdir -p "$STAGE/lib/modules/$KVER/$(dirname "$rel")"
        cp "$ko" "$STAGE/lib/modules/$KVER/$rel"
    done < "$list"
    cp "$MODDIR"/modules.builtin* "$MODDIR"/modules.order "$STAGE/lib/modules/$KVER/" 2>/dev/null || true
    depmod -b "$STAGE" "$KVER" || die "depmod of the initramfs modules failed"
}

# e2e_pack_initramfs STAGE OUTPUT
e2e_pack_initramfs() {
    chmod +x "$1/init"
    (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1 > "$2") || die "cannot pack the initramfs"
}
