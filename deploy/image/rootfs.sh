#!/bin/sh
# Lays out the agent image's whole file system in DIR: lb-agent and lbctl in /usr/local/bin,
# stripped, and the shared libraries they load (what ldd lists: glibc, libgcc_s, the dynamic
# loader) at the paths the loader looks in. Nothing else: no shell, no package manager.
# `cargo xtask image` and deploy/Dockerfile both build the image from this layout.
#   usage: rootfs.sh DIR LB_AGENT LBCTL
set -eu
[ $# -eq 3 ] || { echo "usage: $0 DIR LB_AGENT LBCTL" >&2; exit 2; }
out=$1
rm -rf "$out"
mkdir -p "$out/usr/local/bin"
install -m 0755 "$2" "$out/usr/local/bin/lb-agent"
install -m 0755 "$3" "$out/usr/local/bin/lbctl"
for bin in "$out/usr/local/bin/lb-agent" "$out/usr/local/bin/lbctl"; do
    strip --strip-debug "$bin"
    # ldd prints "name => /path (addr)" or "/path (addr)"; vdso has no file.
    for lib in $(ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }'); do
        mkdir -p "$out$(dirname "$lib")"
        cp -L "$lib" "$out$lib"
    done
done
# Names (the API server's, when given as one) resolve as on the node: /etc/hosts first, then DNS
# (the runtime mounts both files). glibc's default without this file asks DNS first and does not
# read /etc/hosts after a "no such name" answer. glibc 2.34 and later have files and dns built in.
mkdir -p "$out/etc"
echo 'hosts: files dns' > "$out/etc/nsswitch.conf"
# The agent writes nothing but pins (bpffs, mounted); /tmp exists for libraries that expect it.
mkdir -p "$out/tmp"
chmod 1777 "$out/tmp"
