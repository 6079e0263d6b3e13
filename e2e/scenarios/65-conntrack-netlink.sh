# The agent's ctnetlink code against the kernel, checked with conntrack-tools: deleting the
# flows of one removed UDP real server (IPv4 and IPv6) takes exactly those, and deleting every
# flow to a virtual server leaves other ports, other protocols and other servers alone.
. /e2e/lib.sh

# entry CLIENT_PORT VIP VIP_PORT REAL REAL_PORT PROTOCOL CLIENT [MORE]: a tracked flow as IPVS
# leaves one, its original destination the VIP and its replies from the real server.
entry() {
    conntrack -I -p "$6" -s "$7" -d "$2" --sport "$1" --dport "$3" -r "$4" -q "$7" \
        --reply-port-src "$5" --reply-port-dst "$1" -t 120 ${8:-} > /dev/null 2>&1
}

# Start from an empty table: earlier scenarios' connections linger in it.
conntrack -F > /dev/null 2>&1
conntrack -F -f ipv6 > /dev/null 2>&1
entry 40000 10.96.0.53 53 10.0.1.2 5353 udp 10.0.9.9
entry 40001 10.96.0.53 53 10.0.1.2 5353 udp 10.0.9.8
entry 40002 10.96.0.53 53 10.0.2.2 5353 udp 10.0.9.9
entry 40003 10.96.0.53 54 10.0.1.2 5353 udp 10.0.9.9
entry 40004 10.96.0.53 53 10.0.1.2 5353 tcp 10.0.9.9 "--state ESTABLISHED"
entry 40005 fd00:96::53 53 fd00:1::2 5353 udp fd00:9::9
entry 40006 fd00:96::53 53 fd00:2::2 5353 udp fd00:9::9
check entries-created sh -c '[ "$(conntrack -L -f ipv4 2>/dev/null | grep -c .)" = 5 ] && [ "$(conntrack -L -f ipv6 2>/dev/null | grep -c .)" = 2 ]'

out=$(portpolicy debug conntrack-clear udp 10.96.0.53:53 10.0.1.2:5353 2>&1)
[ "$out" = "deleted 2" ] && pass removed-real-server-flows-deleted || fail removed-real-server-flows-deleted "$out"
check other-real-server-port-and-tcp-kept sh -c '
    conntrack -L -f ipv4 2>/dev/null > /tmp/ct.txt
    [ "$(grep -c . /tmp/ct.txt)" = 3 ] && grep -q "sport=40002" /tmp/ct.txt && grep -q "sport=40003" /tmp/ct.txt \
        && grep -q "^tcp .*sport=40004" /tmp/ct.txt && ! grep -q "sport=4000[01] " /tmp/ct.txt'

out=$(portpolicy debug conntrack-clear udp [fd00:96::53]:53 [fd00:1::2]:5353 2>&1)
[ "$out" = "deleted 1" ] && pass ipv6-flow-deleted || fail ipv6-flow-deleted "$out"
check ipv6-other-server-kept sh -c 'conntrack -L -f ipv6 2>/dev/null | grep -q "src=fd00:2::2"'

out=$(portpolicy debug conntrack-clear udp 10.96.0.53:53 2>&1)
[ "$out" = "deleted 1" ] && pass every-flow-to-a-virtual-server-deleted || fail every-flow-to-a-virtual-server-deleted "$out"
check other-port-kept sh -c 'conntrack -L -f ipv4 2>/dev/null | grep -q "dport=54 "'
out=$(portpolicy debug conntrack-clear udp 10.96.0.99:53 2>&1)
[ "$out" = "deleted 0" ] && pass nothing-matching-deletes-nothing || fail nothing-matching-deletes-nothing "$out"

conntrack -F > /dev/null 2>&1
conntrack -F -f ipv6 > /dev/null 2>&1
finish
