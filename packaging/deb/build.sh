#!/usr/bin/env bash
# Build edge-agent_<version>_<arch>.deb from this repository.
#
# The agent and its dependencies go into a virtualenv at /opt/edge-agent, built with
# the Debian python3 (the package depends on it) for this machine's architecture:
# wasmtime ships native wheels, so build on amd64 for amd64 and on arm64 for arm64
# (e.g. on a Raspberry Pi 4/5 with 64-bit Raspberry Pi OS). 32-bit ARM (armhf) is not
# supported: wasmtime publishes no wheels for it.
#
#   packaging/deb/build.sh [OUTPUT_DIR]        (default: build/)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(mkdir -p "${1:-$repo/build}" && cd "${1:-$repo/build}" && pwd)"
python=${DEB_PYTHON:-/usr/bin/python3}

version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/agent/__init__.py")"
arch="$(dpkg --print-architecture)"
case "$arch" in
  amd64|arm64) ;;
  *) echo "build.sh: architecture $arch is not supported (wasmtime wheels: amd64, arm64)" >&2
     exit 1 ;;
esac
name="edge-agent_${version}_${arch}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/$name"
mkdir -p "$root/DEBIAN" "$root/opt" "$root/usr/bin" "$root/lib/systemd/system" \
         "$root/etc/edge-agent" "$root/usr/share/doc/edge-agent/examples"

# The virtualenv, built in place under the staging root, then made relocatable to
# /opt/edge-agent (only the script shebangs name the build path).
"$python" -m venv "$root/opt/edge-agent"
"$root/opt/edge-agent/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-warn-script-location "$repo" 2>&1 | grep -v "is ignored" || true
"$root/opt/edge-agent/bin/python" -c "import agent, wasmtime, paho.mqtt"
grep -rlI --null "$root/opt/edge-agent" "$root/opt/edge-agent/bin" \
  | xargs -0 sed -i "s#$root/opt/edge-agent#/opt/edge-agent#g"
find "$root/opt/edge-agent" -name __pycache__ -type d -prune -exec rm -rf {} +
# Not needed at runtime (and less to attack): activation scripts and pip.
rm -f "$root"/opt/edge-agent/bin/[Aa]ctivate* "$root"/opt/edge-agent/bin/pip*
rm -rf "$root"/opt/edge-agent/lib/python3*/site-packages/pip \
       "$root"/opt/edge-agent/lib/python3*/site-packages/pip-*.dist-info
ln -s /opt/edge-agent/bin/edge-agent "$root/usr/bin/edge-agent"

install -m 0644 "$repo/systemd/edge-agent.service" "$root/lib/systemd/system/"
install -m 0640 "$here/agent.toml" "$root/etc/edge-agent/agent.toml"
install -m 0644 "$repo/README.md" "$root/usr/share/doc/edge-agent/"
install -m 0644 "$here/debian/copyright" "$root/usr/share/doc/edge-agent/"
install -m 0644 "$repo/config/agent.example.toml" "$root/usr/share/doc/edge-agent/examples/"
cp -r "$repo/config/mosquitto" "$root/usr/share/doc/edge-agent/examples/"
gzip -9n -c "$here/debian/changelog" > "$root/usr/share/doc/edge-agent/changelog.gz"

installed_kb="$(du -sk "$root" | cut -f1)"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$installed_kb/" \
    "$here/debian/control" > "$root/DEBIAN/control"
install -m 0644 "$here/debian/conffiles" "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "$here/debian/$script" "$root/DEBIAN/$script"
done

dpkg-deb --root-owner-group --build "$root" "$out/$name.deb" >/dev/null
echo "$out/$name.deb"
