#!/usr/bin/env bash
# Builds the VM lab's boot image (see docs/lab.md): Debian's own kernel and an
# initramfs holding busybox, the data-plane kernel modules, iproute2, iptables,
# tcpdump, ping, kmod, iperf3, wg, the command-channel helper labd, the echo-stream tool
# labping and the request/response and packet-rate tool labperf.
#
# The kernel (SECUREOVERLAY_LAB_KERNEL, the kernel matrix of docs/lab.md):
#   6.1   (default) bookworm's: the linux-image-<ver>-amd64 package that linux-image-amd64
#         depends on, from the machine's own apt sources
#   X.Y   the newest linux-image-X.Y.*+deb13-amd64 in trixie or trixie-backports (6.12 is
#         trixie's own; 6.18 and 7.3 come from backports), with its separate
#         linux-binary-* and linux-modules-* packages where Debian splits them
# trixie's suites come through a private apt configuration under the cache
# (<cache>/apt/trixie: its own sources list, lists and state); the machine's own
# sources are never touched. Packages are downloaded, never installed.
#
# Output, under ${SECUREOVERLAY_CACHE_DIR:-<repo>/.cache}/lab/ (6.1) or lab-<kernel>/:
#   vmlinuz          the kernel
#   initrd.img       gzip'd cpio (newc) root file system
#   kernel.release   e.g. 6.1.0-56-amd64
#   manifest.txt     what went into the image (packages, modules, tools)
#   stamp            hash of every input; a rerun with the same inputs does nothing
#
# Userland comes from the host's Debian packages: each tool is copied with the
# shared libraries ldd names and the dynamic loader. Modules are uncompressed
# in Debian's 6.1 packages; any .ko.xz/.ko.zst is decompressed here so the
# guest's modprobe never needs a decompressor. The package ships no
# modules.dep, so depmod runs on the extracted tree and again on the image.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${SECUREOVERLAY_CACHE_DIR:-$repo/.cache}
out=$cache/lab
GO=${GO:-go}
command -v "$GO" >/dev/null || GO=/usr/local/go/bin/go
mkdir -p "$out/deb"

log() { echo "tools-lab: $*" >&2; }
die() { log "error: $*"; exit 1; }

for t in apt-cache apt-get dpkg dpkg-deb depmod modprobe cpio gzip ldd busybox dash flock xz zstd ip tcpdump ping xtables-nft-multi xtables-legacy-multi iperf3 wg; do
	command -v "$t" >/dev/null || die "missing $t (run hack/install-deps.sh)"
done

exec 9>"$out/.lock"
flock 9

# The modules the guest loads at boot, with their dependencies resolved from
# modules.dep. Anything else in this list's closure is also autoloadable
# (the guest has kmod as /sbin/modprobe and a full modules.alias).
modules=(
	virtio_pci virtio_net virtio_rng 9p 9pnet_virtio # QEMU devices and shares
	esp4 ipip tunnel4 ip_tunnel xfrm_user xfrm_algo xfrm4_tunnel # ESP, IPIP, xfrm netlink
	aead gcm ghash-generic ctr seqiv echainiv # rfc4106(gcm(aes)) and its IV generators
	sha512_generic sha3_generic jitterentropy_rng drbg # stdrng (drbg_nopr_hmac_sha512), seeded by jitterentropy (sha3-256)
	aesni-intel ghash-clmulni-intel cryptd crypto_simd authenc # accelerated variants (-cpu max has AES-NI)
	veth bridge dummy sch_netem # node, pod and underlay plumbing; fault injection
	overlay # containerd's overlayfs snapshotter on the real-node tier (conformance/realnode)
	sch_ingress cls_u32 act_gact # lab.WireCount: kernel packet counters on the underlay bridge's ports
	cls_bpf # tc BPF programs that forward as Calico's eBPF data plane does (reconciler/xfrm TestCalicoEBPF*)
	x_tables ip_tables iptable_filter iptable_mangle iptable_raw iptable_nat # iptables-legacy
	nf_tables nft_compat nft_chain_nat nft_ct nft_reject_ipv4 # iptables-nft (the guest's default "iptables")
	xt_policy xt_mark xt_comment xt_conntrack xt_addrtype xt_multiport xt_tcpudp xt_set xt_NFLOG xt_LOG
	xt_MASQUERADE xt_nat ipt_REJECT nf_conntrack nf_nat nfnetlink nfnetlink_log
	wireguard authencesn # the data-plane benchmark: WireGuard, and ESP with the null cipher (ESN with a non-AEAD algorithm)
)
# Modules in the image that the guest does not load at boot: esp4_offload (ESP's GSO/GRO
# path) changes how ESP is received, so only the data-plane benchmark's offload modes load it
# (SECUREOVERLAY_BENCH_DP_MODES=…,esp-offload; docs/dataplane.md §11).
image_modules=(esp4_offload)
# Host tools copied into the image at the path the host's PATH finds them
# (under /usr in the image; the image's /bin and /sbin hold busybox and kmod).
tools=(ip ss tc bridge nstat xtables-nft-multi xtables-legacy-multi tcpdump ping kmod iperf3 wg)

# --- inputs and stamp --------------------------------------------------------
lab_kernel=${SECUREOVERLAY_LAB_KERNEL:-6.1}
apt=(apt-get) acache=(apt-cache)
case $lab_kernel in
6.1) ;;
[0-9]*.[0-9]*)
	out=$cache/lab-$lab_kernel
	mkdir -p "$out/deb"
	pa=$cache/apt/trixie
	mkdir -p "$pa"/etc/{sources.list.d,preferences.d,apt.conf.d} "$pa"/state/lists/partial "$pa"/cache/archives/partial
	touch "$pa/state/status"
	printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian %s main\n' \
		trixie trixie-backports >"$pa/etc/sources.list"
	opts=(-o "Dir::Etc=$pa/etc" -o "Dir::Etc::sourcelist=$pa/etc/sources.list" -o "Dir::Etc::sourceparts=$pa/etc/sources.list.d"
		-o "Dir::Etc::preferencesparts=$pa/etc/preferences.d" -o "Dir::Etc::parts=$pa/etc/apt.conf.d"
		-o "Dir::State=$pa/state" -o "Dir::State::status=$pa/state/status" -o "Dir::Cache=$pa/cache" -o APT::Architecture=amd64)
	apt=(apt-get "${opts[@]}") acache=(apt-cache "${opts[@]}")
	;;
*) die "SECUREOVERLAY_LAB_KERNEL=$lab_kernel: want a kernel series such as 6.1 (bookworm), 6.12 (trixie) or 7.3 (trixie-backports)" ;;
esac

# split_debs PKG prints PKG's linux-binary-*/linux-modules-* dependencies: from 6.19 on,
# Debian splits a kernel into linux-image-* (empty), linux-binary-* (vmlinuz) and
# linux-modules-*.
# linux-base-* (System.map, config, modules.builtin*) comes with them.
split_debs() {
	local deps
	deps=$("${acache[@]}" show "$1" 2>/dev/null | awk -F': ' '/^Depends:/{print $2; exit}' | tr ',' '\n' | awk '{print $1}')
	echo "$deps" | grep -qE '^linux-modules-' || return 0
	echo "$deps" | grep -E '^linux-(base|binary|modules)-[0-9]' || true
}

# resolve_kernel prints the kernel image package for $lab_kernel (empty if the lists do not
# know one): bookworm's or trixie's default kernel, else the newest of the series in trixie
# or trixie-backports whose split packages are all in the archive (the archive has dropped
# some series' module packages while keeping their images).
resolve_kernel() {
	local series=${lab_kernel//./[.]} p d ok
	case $lab_kernel in
	6.1) "${acache[@]}" depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}' ;;
	*)
		for p in $("${acache[@]}" search --names-only "^linux-image-${series}[.][0-9]+[+]deb13-amd64\$" 2>/dev/null | awk '{print $1}' | sort -rV); do
			ok=1
			for d in $(split_debs "$p"); do
				[[ $("${acache[@]}" policy "$d" 2>/dev/null) == *"Candidate: "[0-9]* ]] || { ok=; log "skipping $p: $d is not in the archive"; break; }
			done
			[ -n "$ok" ] && { echo "$p"; return; }
		done
		;;
	esac
}
kpkg=$(resolve_kernel || true)
if [ -z "$kpkg" ]; then
	log "apt lists do not know the $lab_kernel kernel; running apt-get update"
	"${apt[@]}" update -qq
	kpkg=$(resolve_kernel || true)
fi
[ -n "$kpkg" ] || die "cannot resolve the $lab_kernel kernel package"
kver_pkg=$("${acache[@]}" policy "$kpkg" | awk '/Candidate:/{print $2}')
kdebs=("$kpkg" $(split_debs "$kpkg"))

stamp=$(
	{
		echo "kernel $lab_kernel ${kdebs[*]} $kver_pkg"
		sha256sum "$0"
		(cd "$repo" && find conformance/lab/guest conformance/lab/wire -type f | LC_ALL=C sort | xargs sha256sum)
		dpkg-query -W -f='${Package} ${Version}\n' iproute2 iptables tcpdump busybox-static kmod iputils-ping libc6 dash iperf3 wireguard-tools
		"$GO" version
		printf '%s\n' "${modules[@]}" "${image_modules[@]}" "${tools[@]}"
	} | sha256sum | cut -d' ' -f1
)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] &&
	[ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
	log "up to date ($(cat "$out/kernel.release"), $(du -h "$out/initrd.img" | cut -f1) initramfs)"
	exit 0
fi

# --- kernel --------------------------------------------------------------------
debs=()
for p in "${kdebs[@]}"; do
	d=$(ls "$out/deb/${p}_"*.deb 2>/dev/null | head -1 || true)
	if [ -z "$d" ]; then
		log "downloading $p ($kver_pkg)"
		(cd "$out/deb" && { "${apt[@]}" download -q "$p=$kver_pkg" 2>/dev/null || { "${apt[@]}" update -qq && "${apt[@]}" download -q "$p=$kver_pkg"; }; })
		d=$(ls "$out/deb/${p}_"*.deb | head -1)
	fi
	debs+=("$d")
done
# Older kernel packages from earlier runs are of no use.
for d in "$out"/deb/linux-*.deb; do
	[ -e "$d" ] || continue
	case " ${debs[*]} " in *" $d "*) ;; *) rm -f "$d" ;; esac
done

work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
for d in "${debs[@]}"; do
	log "extracting $(basename "$d")"
	dpkg-deb -x "$d" "$work/k"
done
# Debian 13's packages put the modules under /usr/lib (merged /usr), bookworm's under /lib.
if [ -d "$work/k/usr/lib/modules" ] && [ ! -d "$work/k/lib/modules" ]; then
	mkdir -p "$work/k/lib" && mv "$work/k/usr/lib/modules" "$work/k/lib/modules"
fi
krel=$(ls "$work/k/lib/modules")
[ "$(echo "$krel" | wc -w)" = 1 ] || die "expected one module tree in ${debs[*]}, got: $krel"
kmods=$work/k/lib/modules/$krel
# Decompress compressed modules (busybox and minimal userlands cannot load them).
find "$kmods" -name '*.ko.xz' -exec xz -d {} +
find "$kmods" -name '*.ko.zst' -exec zstd -q -d --rm {} +
depmod -b "$work/k" "$krel"

# --- root file system -----------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib64,etc/lab,proc,sys,dev,run,tmp,root,mnt}
mkdir -p "$root/var/lib" && ln -s ../run "$root/var/run"

# copy_elf FILE DEST: FILE at DEST in the image plus every library ldd names.
copy_elf() {
	local f=$1 dest=$2
	mkdir -p "$(dirname "$root$dest")"
	cp -L "$f" "$root$dest"
	ldd "$f" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do
		[ -e "$root$lib" ] && continue
		mkdir -p "$(dirname "$root$lib")"
		cp -L "$lib" "$root$lib"
	done
}

for t in "${tools[@]}"; do
	p=$(command -v "$t") || die "missing tool $t"
	case $p in /bin/* | /sbin/*) dest=/usr$p ;; *) dest=$p ;; esac
	copy_elf "$p" "$dest"
done
for so in /usr/lib/x86_64-linux-gnu/xtables/*.so; do copy_elf "$so" "$so"; done
kmod_path=$(cd "$root" && find usr -name kmod -type f | head -1)
for m in modprobe insmod rmmod lsmod modinfo depmod; do ln -s "../$kmod_path" "$root/sbin/$m"; done
for v in nft legacy; do
	for c in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
		ln -s "xtables-$v-multi" "$root/usr/sbin/$c-$v"  # both multi binaries live in /usr/sbin
	done
done
# Debian's default backend (update-alternatives picks iptables-nft).
for c in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
	ln -s "$c-nft" "$root/usr/sbin/$c"
done

# /bin/sh is dash, as on the host: Debian's static busybox shell runs its own
# applets before PATH (FEATURE_SH_STANDALONE), which would shadow the real ip
# and ping with busybox's cut-down ones.
copy_elf "$(readlink -f /bin/dash)" /bin/sh
# busybox for everything the real tools above do not provide.
cp /bin/busybox "$root/bin/busybox"
for a in $(busybox --list); do
	for d in bin sbin usr/bin usr/sbin; do [ -e "$root/$d/$a" ] && continue 2; done
	ln -s busybox "$root/bin/$a"
done
ln -s bin/busybox "$root/init"

log "building labd, labping and labperf"
CGO_ENABLED=0 "$GO" build -C "$repo" -trimpath -ldflags '-s -w' -o "$root/sbin/labd" ./conformance/lab/guest/labd
CGO_ENABLED=0 "$GO" build -C "$repo" -trimpath -ldflags '-s -w' -o "$root/sbin/labping" ./conformance/lab/guest/labping
CGO_ENABLED=0 "$GO" build -C "$repo" -trimpath -ldflags '-s -w' -o "$root/sbin/labperf" ./conformance/lab/guest/labperf

install -m 0755 "$repo/conformance/lab/guest/rc" "$root/etc/lab/rc"
install -m 0644 "$repo/conformance/lab/guest/inittab" "$root/etc/inittab"

# Protocol and service names (netbase) for iptables -p and tcpdump, when the host has them.
for f in /etc/protocols /etc/services; do [ -f "$f" ] && cp "$f" "$root/etc/"; done
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
tcpdump:x:104:110::/nonexistent:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
tcpdump:x:110:
nogroup:x:65534:
EOF
echo "127.0.0.1 localhost lab" >"$root/etc/hosts"

# Modules: the closure of the list above, uncompressed, with a fresh depmod.
: >"$work/modfiles"
# Bookworm's kernel must have every module; other series may have renamed or merged some
# (6.18 has no sha512_generic: SHA-512 moved to lib/crypto): those are left out of the
# boot list and named in the manifest, and the lab's tests show whether anything is amiss.
absent=()
for m in "${modules[@]}" "${image_modules[@]}"; do
	if ! modprobe -d "$work/k" -S "$krel" --show-depends "$m" >>"$work/modfiles" 2>/dev/null; then
		[ "$lab_kernel" = 6.1 ] && die "kernel $krel has no module $m"
		log "kernel $krel has no module $m; left out"
		absent+=("$m")
	fi
done
boot_modules=()
for m in "${modules[@]}"; do
	case " ${absent[*]-} " in *" $m "*) ;; *) boot_modules+=("$m") ;; esac
done
printf '%s\n' "${boot_modules[@]}" >"$root/etc/lab/modules"
mkdir -p "$root/lib/modules/$krel"
cp "$kmods"/modules.order "$kmods"/modules.builtin "$kmods"/modules.builtin.modinfo "$root/lib/modules/$krel/"
awk '$1 == "insmod" {print $2}' "$work/modfiles" | sort -u | while read -r f; do
	rel=${f#"$work/k/lib/modules/$krel/"}
	mkdir -p "$(dirname "$root/lib/modules/$krel/$rel")"
	cp "$f" "$root/lib/modules/$krel/$rel"
done
depmod -b "$root" "$krel"

{
	echo "kernel package: $kpkg $kver_pkg ($krel)"
	dpkg-query -W -f='userland: ${Package} ${Version}\n' iproute2 iptables tcpdump busybox-static kmod iputils-ping libc6 iperf3 wireguard-tools
	echo "modules loaded at boot: ${boot_modules[*]}"
	[ "${#absent[@]}" -eq 0 ] || echo "modules this kernel lacks (left out): ${absent[*]}"
	echo "module files:"
	(cd "$root/lib/modules/$krel" && find . -name '*.ko' | LC_ALL=C sort | sed 's/^/  /')
	echo "tools: ${tools[*]}"
} >"$work/manifest.txt"

log "packing initramfs ($(du -sh "$root" | cut -f1) unpacked)"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -6) >"$work/initrd.img"

# bookworm and trixie ship /boot/vmlinuz-<release>; the split packages (6.19 on) /usr/lib/modules/<release>/vmlinuz.
if [ -f "$work/k/boot/vmlinuz-$krel" ]; then cp "$work/k/boot/vmlinuz-$krel" "$work/vmlinuz"; else cp "$kmods/vmlinuz" "$work/vmlinuz"; fi
echo "$krel" >"$work/kernel.release"
for f in vmlinuz initrd.img kernel.release manifest.txt; do mv -f "$work/$f" "$out/$f"; done
echo "$stamp" >"$out/stamp"
log "built $out: kernel $krel, initramfs $(du -h "$out/initrd.img" | cut -f1)"
