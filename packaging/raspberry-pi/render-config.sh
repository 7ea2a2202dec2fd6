#!/bin/sh
# Write an edge-agent config for an image: render-config.sh BROKER [DEVICE_TYPE] > agent.toml
# device_id is left out: firstboot.sh sets it from the board's serial number.
set -eu
broker="${1:?usage: render-config.sh BROKER [DEVICE_TYPE]}"
device_type="${2:-rpi}"
cat <<TOML
# Written at image build time by packaging/raspberry-pi/render-config.sh.
# device_id is set at first boot from the board serial (edge-agent-firstboot.service).
device_type = "${device_type}"

[mqtt]
broker = "${broker}"
TOML
