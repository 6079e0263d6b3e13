# The dummy interface is created up and its addresses synced, without touching other interfaces.
. /e2e/lib.sh

nsip link add other0 type dummy
nsip addr add 10.96.0.30/32 dev other0

check dummy-sync-creates-and-adds portpolicy debug dummy-sync 10.96.0.30 10.96.0.31 fd00::30
nsip addr show dev portpolicy-ipvs > /tmp/addr.txt
cat /tmp/addr.txt
check dummy-link-is-up-and-dummy sh -c "nsip -d link show portpolicy-ipvs | grep -q 'UP' && nsip -d link show portpolicy-ipvs | grep -q dummy"
check dummy-holds-ipv4-host-address grep -q 'inet 10.96.0.31/32' /tmp/addr.txt
check dummy-holds-ipv6-host-address grep -q 'inet6 fd00::30/128' /tmp/addr.txt

portpolicy debug dummy-sync 10.96.0.31 fd00::31 > /tmp/sync.out 2>&1
cat /tmp/sync.out
check dummy-sync-counts-changes grep -q '^portpolicy-ipvs: added 1, removed 2$' /tmp/sync.out
nsip addr show dev portpolicy-ipvs > /tmp/addr.txt
check dummy-removed-extra-addresses sh -c "! grep -q -e 10.96.0.30 -e 'fd00::30' /tmp/addr.txt"
check dummy-kept-desired-addresses sh -c "grep -q 'inet 10.96.0.31/32' /tmp/addr.txt && grep -q 'inet6 fd00::31/128' /tmp/addr.txt"
check other-interface-untouched sh -c "nsip addr show dev other0 | grep -q 'inet 10.96.0.30/32'"

portpolicy debug dummy-sync 10.96.0.31 fd00::31 > /tmp/sync.out 2>&1
check dummy-sync-is-idempotent grep -q '^portpolicy-ipvs: added 0, removed 0$' /tmp/sync.out
nsip link set portpolicy-ipvs down
check dummy-ensure-brings-it-up sh -c "portpolicy debug dummy-sync 10.96.0.31 fd00::31 && nsip link show portpolicy-ipvs | grep -q ',UP'"
nsip link add veth-x type veth peer name veth-y
if portpolicy debug dummy-sync --name veth-x 1.2.3.4 > /tmp/sync.out 2>&1; then
    fail refuses-non-dummy-interface "accepted a veth"
else
    check refuses-non-dummy-interface grep -q 'not dummy' /tmp/sync.out
fi

portpolicy debug dummy-sync > /dev/null
check dummy-sync-to-empty sh -c "! nsip addr show dev portpolicy-ipvs | grep -q 'inet.* scope global'"
nsip link del portpolicy-ipvs
nsip link del other0
nsip link del veth-x
finish
