#!/usr/bin/env bash
# The package checks of the test command: builds the five .debs from the debug binaries
# the test command already built (`scripts/package.sh --debug`: no release build), then
# checks each package's contents (binary, man pages, completions, unit, conffiles,
# postinst), that the units pass `systemd-analyze verify` with no warning, and that the
# extracted binaries run `--help` and `--version`. Prints `ok NAME` per check; exits 1
# at the first failure, naming it.
set -euo pipefail
cd "$(dirname "$0")/.."

programs=(imageserver imagetool subd dominator mdb)
daemons=(imageserver subd dominator)
start=$(date +%s)
fail() { echo "FAILED package check: $*" >&2; exit 1; }
ok() { echo "ok $*"; }

rm -f target/debian/*.deb
./scripts/package.sh --debug >/dev/null 2>target/debian-build.log || {
    cat target/debian-build.log >&2
    fail "scripts/package.sh --debug"
}
root=$(mktemp -d)
# cargo-deb leaves its stripped copies of the binaries in target/PROGRAM/: not needed after.
trap 'rm -rf "$root"; for p in "${programs[@]}"; do rm -f target/"$p"/*.stripped-*.tmp; rmdir target/"$p" 2>/dev/null || true; done' EXIT

is_daemon() { [[ " ${daemons[*]} " == *" $1 "* ]]; }

for p in "${programs[@]}"; do
    deb=$(ls target/debian/"${p}"_*.deb 2>/dev/null | head -1)
    [ -n "$deb" ] || fail "no target/debian/${p}_*.deb"
    contents=$(dpkg-deb -c "$deb" | awk '{print $NF}')
    want=(./usr/bin/$p ./usr/share/man/man1/$p.1.gz
          ./usr/share/bash-completion/completions/$p
          ./usr/share/zsh/vendor-completions/_$p
          ./usr/share/fish/vendor_completions.d/$p.fish)
    is_daemon "$p" && want+=(./lib/systemd/system/$p.service ./etc/default/$p)
    for f in "${want[@]}"; do
        grep -qxF "$f" <<<"$contents" || fail "$deb lacks $f"
    done
    ok "package_contents_$p"
    # Every subcommand has its page: PROGRAM-SUB.1 for each line of `help`'s command list.
    for sub in $(target/debug/$p --help | awk '/^Commands:/{on=1;next} /^$/{on=0} on{print $1}'); do
        [ "$sub" = help ] && continue
        grep -qxF "./usr/share/man/man1/$p-$sub.1.gz" <<<"$contents" || fail "$deb lacks the man page of $p $sub"
    done
    ok "man_pages_$p"
    conffiles=$(dpkg-deb -f "$deb" Package >/dev/null; dpkg-deb -I "$deb" conffiles 2>/dev/null || true)
    if is_daemon "$p"; then
        grep -qxF "/etc/default/$p" <<<"$conffiles" || fail "$deb: /etc/default/$p is not a conffile"
        ok "conffiles_$p"
    fi
    case $p in
    imageserver | dominator)
        dpkg-deb -I "$deb" postinst | grep -q "adduser --system .* $p" || fail "$deb: postinst does not create the $p user"
        dpkg-deb -I "$deb" postinst | sh -n || fail "$deb: postinst is not valid sh"
        dpkg-deb -f "$deb" Depends | grep -q adduser || fail "$deb does not depend on adduser"
        grep -qx "User=$p" "$p/debian/$p.service" || fail "$p.service does not run as $p"
        ok "system_user_$p" ;;
    esac
    dpkg-deb -x "$deb" "$root"
    zcat "$root/usr/share/man/man1/$p.1.gz" | grep -q '^\.SH SYNOPSIS' || fail "$p.1.gz is not a man page"
    grep -q "$p" "$root/usr/share/bash-completion/completions/$p" || fail "bash completion of $p"
done

# systemd-analyze verify in the extracted tree (the binaries must exist there; the
# stock units for the targets ours name are copied in), man pages found there too.
mkdir -p "$root/usr/lib/systemd"
cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/" 2>/dev/null || cp -r /lib/systemd/system "$root/usr/lib/systemd/"
for p in "${daemons[@]}"; do
    unit=/lib/systemd/system/$p.service
    out=$(MANPATH="$root/usr/share/man" systemd-analyze verify --root="$root" "$unit" 2>&1) || fail "systemd-analyze verify $p.service: $out"
    [ -z "$out" ] || fail "systemd-analyze verify $p.service warns: $out"
    grep -qx "Restart=on-failure" "$root$unit" || fail "$p.service lacks Restart=on-failure"
    ok "systemd_analyze_verify_$p"
done
for p in imageserver dominator; do
    for d in NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes; do
        grep -qx "$d" "$root/lib/systemd/system/$p.service" || fail "$p.service lacks $d"
    done
    ok "hardening_$p"
done
grep -q 'ExecStart=/usr/bin/imageserver --data-dir /var/lib/imageserver' "$root/lib/systemd/system/imageserver.service" || fail "imageserver.service: data dir is not /var/lib/imageserver"
grep -q 'ExecStart=/usr/bin/dominator --mdb /var/lib/mdbd/mdb.json' "$root/lib/systemd/system/dominator.service" || fail "dominator.service: MDB is not /var/lib/mdbd/mdb.json"
ok "unit_default_paths"

# The installed binaries run.
for p in "${programs[@]}"; do
    "$root/usr/bin/$p" --help >/dev/null || fail "$p --help"
    v=$("$root/usr/bin/$p" --version) || fail "$p --version"
    [[ "$v" == "$p "* ]] || fail "$p --version printed '$v'"
    ok "installed_binary_runs_$p"
done
echo "package checks passed in $(($(date +%s) - start)) s"
