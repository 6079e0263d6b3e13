# Shared by e2e/run-prometheus and e2e/run-system: Debian's `prometheus` package (server and
# promtool), installed when missing and possible (root and apt-get) without starting its
# service. Never fails: callers check `command -v prometheus promtool` and report what they
# could not run.
e2e_prometheus() {
    if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        # Installing must not start a system-wide Prometheus: policy-rc.d says no to services.
        local added_policy=
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            added_policy=1
        fi
        { apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 ||
          { apt-get update >/dev/null 2>&1 &&
            apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1; }; } || true
        [ -n "$added_policy" ] && rm -f /usr/sbin/policy-rc.d
    fi
    return 0
}
