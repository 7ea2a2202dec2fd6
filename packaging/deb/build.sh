#!/usr/bin/env bash
# Build edge-agent_<version>_<arch>.deb from this repository.
#
# The agent and its dependencies go into a virtualenv at /opt/edge-agent, built with
# the Debian python3 (the package depends on it) for this machine's architecture:
# wasmtime ships native wheels, so build on amd64 for amd64 and on arm64 for arm64
# (e.g. on a Raspberry Pi 4/5 with 64-bit Raspberry Pi OS). 32-bit ARM (armhf) is not
# supported: wasmtime publishes no wheels for it.
#
#   packaging/deb/build.sh [OUTPUT_DIR]            the device agent   (default: build/)
#   packaging/deb/build.sh --server [OUTPUT_DIR]   edge-agent-server, the control plane
#
# The two packages do not share files: the server's virtualenv is
# /opt/edge-agent-server (with the `server` extra), its unit runs
# /opt/edge-agent-server/bin/edge-agent, and the device package stays small.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
variant=agent
if [ "${1:-}" = "--server" ]; then
  variant=server
  shift
fi
out="$(mkdir -p "${1:-$repo/build}" && cd "${1:-$repo/build}" && pwd)"
python=${DEB_PYTHON:-/usr/bin/python3}
if [ "$variant" = server ]; then
  pkg=edge-agent-server; spec="${repo}[server]"; meta="$here/debian-server"
  probe="import agent.server.api.app, uvicorn, psycopg"
else
  pkg=edge-agent; spec="$repo"; meta="$here/debian"
  probe="import agent, wasmtime, paho.mqtt"
fi

version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/agent/__init__.py")"
arch="$(dpkg --print-architecture)"
case "$arch" in
  amd64|arm64) ;;
  *) echo "build.sh: architecture $arch is not supported (wasmtime wheels: amd64, arm64)" >&2
     exit 1 ;;
esac
name="${pkg}_${version}_${arch}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/$name"
doc="$root/usr/share/doc/$pkg"
mkdir -p "$root/DEBIAN" "$root/opt" "$root/lib/systemd/system" "$root/etc/$pkg" "$doc/examples"

# The virtualenv, built in place under the staging root (no byte-code: postinst
# compiles on the target), then made relocatable to
# /opt/$pkg (only the script shebangs name the build path).
venv="$root/opt/$pkg"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile \
    --no-warn-script-location "$spec" 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -c "$probe"
grep -rlI --null "$venv" "$venv/bin" | xargs -0 sed -i "s#$venv#/opt/$pkg#g"
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
# Not needed at runtime (and less to attack): activation scripts and pip.
rm -f "$venv"/bin/[Aa]ctivate* "$venv"/bin/pip*
rm -rf "$venv"/lib/python3*/site-packages/pip "$venv"/lib/python3*/site-packages/pip-*.dist-info

install -m 0644 "$repo/systemd/$pkg.service" "$root/lib/systemd/system/"
install -m 0644 "$repo/README.md" "$doc/"
install -m 0644 "$here/debian/copyright" "$doc/"
gzip -9n -c "$here/debian/changelog" > "$doc/changelog.gz"
if [ "$variant" = server ]; then
  install -m 0640 "$here/server.toml" "$root/etc/$pkg/server.toml"
  install -m 0644 "$repo/docs/server.md" "$repo/docs/losant-api.md" "$doc/"
else
  mkdir -p "$root/usr/bin"
  ln -s /opt/edge-agent/bin/edge-agent "$root/usr/bin/edge-agent"
  install -m 0640 "$here/agent.toml" "$root/etc/edge-agent/agent.toml"
  install -m 0644 "$repo/config/agent.example.toml" "$doc/examples/"
  cp -r "$repo/config/mosquitto" "$doc/examples/"
fi

installed_kb="$(du -sk "$root" | cut -f1)"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$installed_kb/" \
    "$meta/control" > "$root/DEBIAN/control"
install -m 0644 "$meta/conffiles" "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "$meta/$script" "$root/DEBIAN/$script"
done

# gzip: every dpkg reads it, and it builds several times faster than the default xz.
# DEB_GZIP_LEVEL (1-9, default 9): the tests build with 1 (a package ~15 % larger, its
# compression three times faster; what it holds is the same).
dpkg-deb --root-owner-group -Zgzip -z"${DEB_GZIP_LEVEL:-9}" --build "$root" "$out/$name.deb" >/dev/null
echo "$out/$name.deb"
