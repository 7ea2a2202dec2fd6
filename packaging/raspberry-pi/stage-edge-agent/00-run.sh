#!/bin/bash -e
# pi-gen stage: install edge-agent into the image and configure it.
#   EDGE_AGENT_DEB     path to edge-agent_<version>_arm64.deb (built on arm64)
#   EDGE_AGENT_BROKER  e.g. mqtts://mqtt.example.com:8883
# ROOTFS_DIR and on_chroot are provided by pi-gen.
: "${EDGE_AGENT_DEB:?set EDGE_AGENT_DEB to the arm64 .deb}"
: "${EDGE_AGENT_BROKER:?set EDGE_AGENT_BROKER}"
here="$(cd "$(dirname "$0")" && pwd)"

install -m 0644 "${EDGE_AGENT_DEB}" "${ROOTFS_DIR}/tmp/edge-agent.deb"
on_chroot <<CHROOT
apt-get install -y /tmp/edge-agent.deb
rm /tmp/edge-agent.deb
CHROOT

"${here}/../render-config.sh" "${EDGE_AGENT_BROKER}" rpi > "${ROOTFS_DIR}/etc/edge-agent/agent.toml"
install -m 0755 "${here}/../firstboot.sh" "${ROOTFS_DIR}/usr/local/sbin/edge-agent-firstboot"
install -m 0644 "${here}/../edge-agent-firstboot.service" \
    "${ROOTFS_DIR}/etc/systemd/system/edge-agent-firstboot.service"
on_chroot <<CHROOT
chown root:edge-agent /etc/edge-agent/agent.toml
chmod 0640 /etc/edge-agent/agent.toml
systemctl enable edge-agent-firstboot.service edge-agent.service
CHROOT
