#!/bin/sh
# First boot: give the agent this board's identity, then (re)start it.
# The device id is "rpi-" + the board serial (unique per Raspberry Pi), unless the
# config already names one. Run by edge-agent-firstboot.service, or by cloud-init.
set -eu
conf="${EDGE_AGENT_CONF:-/etc/edge-agent/agent.toml}"
serial_file="${EDGE_AGENT_SERIAL_FILE:-/sys/firmware/devicetree/base/serial-number}"
done_mark="${EDGE_AGENT_FIRSTBOOT_MARK:-/var/lib/edge-agent-firstboot.done}"

if grep -q '^device_id[[:space:]]*=' "$conf"; then
    echo "firstboot: $conf already sets device_id; leaving it"
else
    if [ -r "$serial_file" ]; then
        serial="$(tr -d '\000[:space:]' < "$serial_file")"
    else
        serial="$(sed -n 's/^Serial[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | tr -d '[:space:]')"
    fi
    serial="$(printf '%s' "$serial" | tr -cd '0-9A-Za-z' | sed 's/^0*//')"
    if [ -z "$serial" ]; then
        echo "firstboot: no board serial found; the agent will use the host name" >&2
    else
        tmp="$(mktemp "${conf}.XXXXXX")"
        { printf 'device_id = "rpi-%s"\n' "$serial"; cat "$conf"; } > "$tmp"
        chmod --reference="$conf" "$tmp" 2>/dev/null || chmod 0640 "$tmp"
        mv "$tmp" "$conf"
        echo "firstboot: device_id = rpi-$serial"
    fi
fi
touch "$done_mark"
if [ -z "${EDGE_AGENT_NO_RESTART:-}" ] && [ -d /run/systemd/system ]; then
    systemctl restart edge-agent.service || true
fi
