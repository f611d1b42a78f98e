#!/bin/sh
# Rendered by `berth templates render` from template.toml; edit that, not this.
# Starts sshd (keys only), then the app on 27015, then stays alive.
set -e
mkdir -p /root/.ssh /run/sshd /app
chmod 0700 /root/.ssh
if [ -n "${SSH_PUBLIC_KEY:-}" ]; then
    grep -qxF "$SSH_PUBLIC_KEY" /root/.ssh/authorized_keys 2>/dev/null || printf '%s\n' "$SSH_PUBLIC_KEY" >> /root/.ssh/authorized_keys
    chmod 0600 /root/.ssh/authorized_keys
fi
ssh-keygen -A >/dev/null 2>&1 || true
/usr/sbin/sshd -f /etc/berth/sshd_config
cd /app
sh -c 'jupyter lab --ip=0.0.0.0 --port=27015 --no-browser --allow-root --ServerApp.base_url=/' > /app/app.log 2>&1 &
exec sleep infinity
