# The real agent on two inputs the kernel is picky about:
# - overlapping loadBalancerSourceRanges (10.0.0.0/8 with 10.1.0.0/16 inside it, and one range
#   twice): `lb-allowed` is an interval set and nft refuses overlapping elements, so the agent
#   must write a transaction nft accepts, and the ranges must still decide who connects;
# - a node address that goes away (delegated mode): the agent's node ports on it go too, while
#   a virtual server it does not own on that address stays; and the same when the address goes
#   while the agent is down.
. /e2e/lib.sh
trap "" PIPE

SNAP=/tmp/ranges-snapshot
METRICS=127.0.0.1:10267
mkdir -p "$SNAP"

# write_snapshot NODE_ADDRESSES SOURCE_RANGES: NODE_ADDRESSES a YAML list of InternalIP entries.
write_snapshot() {
    cat > /tmp/ranges.yaml.new <<EOF
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [$1]}
---
apiVersion: v1
kind: Service
metadata:
  name: lb
  namespace: shop
  labels: {service.kubernetes.io/service-proxy-name: portpolicy}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  loadBalancerSourceRanges: $2
  ports: [{name: p, port: 80, targetPort: 8080, nodePort: 30085}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.40}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: lb-1
  namespace: shop
  labels: {kubernetes.io/service-name: lb}
addressType: IPv4
ports: [{name: p, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [10.0.21.2], nodeName: node-a, conditions: {ready: true}}
EOF
    mv /tmp/ranges.yaml.new "$SNAP/cluster.yaml"
}
metric() { # NAME: the value of an unlabeled metric
    printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc -w 2 127.0.0.1 10267 | awk -v m="$1" '$1 == m { print $2 }'
}
ext_get() { # ADDRESS PORT: the body a client on the external network gets
    nsip netns exec ext2 sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 $1 $2 | tail -n 1"
}

pod r1 21
# An external client at 10.3.7.2; the node is 10.3.7.1 there (and 10.3.7.5, which goes away).
linked_ns ext2 veth-ext2 10.3.7.2 10.3.7.1

# kube-proxy's virtual server on the address that goes away: not the agent's (its port is no
# node port of the agent's).
ipvsadm -A -t 10.3.7.5:31500 -s rr

TWO="{type: InternalIP, address: 10.3.7.1}, {type: InternalIP, address: 10.3.7.5}"
write_snapshot "$TWO" "[10.1.0.0/16, 10.0.0.0/8, 10.1.0.0/16]"
portpolicy agent --node-name node-a --snapshot "$SNAP" --metrics-address "$METRICS" \
    --resync-period 2s --snapshot-poll 100ms > /tmp/ranges-agent.log 2>&1 &
AGENT=$!
if wait_for 20 sh -c "printf 'GET /readyz HTTP/1.0\r\n\r\n' | nc -w 1 127.0.0.1 10267 | head -n 1 | grep -q ' 200 '"; then
    pass ranges-agent-ready
else
    fail ranges-agent-ready "$(tail -n 3 /tmp/ranges-agent.log | tr '\n' ' ')"
fi

# --- overlapping source ranges ------------------------------------------------------------------
nft list set ip portpolicy lb-allowed > /tmp/lb-allowed.txt 2>&1
cat /tmp/lb-allowed.txt
check overlapping-ranges-written-as-one-element sh -c \
    'grep -qE "203\.0\.113\.40 \. (tcp|6) \. 80 \. 10\.0\.0\.0/8" /tmp/lb-allowed.txt && ! grep -q "10\.1\.0\.0/16" /tmp/lb-allowed.txt'
sleep 2.5 # at least one full resync, which refills the sets
check overlapping-ranges-sync-without-errors sh -c \
    "[ \"\$(printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc -w 2 127.0.0.1 10267 | awk '\$1 == \"portpolicy_agent_sync_errors_total\" { print \$2 }')\" = 0 ]"
got=$(ext_get 203.0.113.40 80)
[ "$got" = pod-r1 ] && pass client-inside-the-ranges-connects || fail client-inside-the-ranges-connects "'$got'"

# The same ranges narrowed: the client is outside now and dropped.
write_snapshot "$TWO" "[192.0.2.0/24, 192.0.2.0/24, 192.0.2.128/25]"
check narrowed-ranges-applied wait_for 5 sh -c \
    'nft list set ip portpolicy lb-allowed | grep -qE "203\.0\.113\.40 \. (tcp|6) \. 80 \. 192\.0\.2\.0/24" && ! nft list set ip portpolicy lb-allowed | grep -q "10\.0\.0\.0/8"'
got=$(ext_get 203.0.113.40 80)
[ -z "$got" ] && pass client-outside-the-ranges-dropped || fail client-outside-the-ranges-dropped "'$got'"
write_snapshot "$TWO" "[10.3.7.0/24, 10.0.0.0/8]"
check widened-ranges-applied wait_for 5 sh -c \
    'nft list set ip portpolicy lb-allowed | grep -qE "203\.0\.113\.40 \. (tcp|6) \. 80 \. 10\.0\.0\.0/8"'
got=$(ext_get 203.0.113.40 80)
[ "$got" = pod-r1 ] && pass client-inside-again-connects || fail client-inside-again-connects "'$got'"

# --- a node address that goes away --------------------------------------------------------------
ipvsadm -Ln > /tmp/ranges-ipvs.txt
check node-ports-on-both-addresses sh -c \
    'grep -q "10\.3\.7\.1:30085 " /tmp/ranges-ipvs.txt && grep -q "10\.3\.7\.5:30085 " /tmp/ranges-ipvs.txt'
write_snapshot "{type: InternalIP, address: 10.3.7.1}" "[10.3.7.0/24, 10.0.0.0/8]"
check node-port-on-the-gone-address-deleted wait_for 5 sh -c '! ipvsadm -Ln | grep -q "10\.3\.7\.5:30085 "'
check node-port-on-the-remaining-address-kept sh -c 'ipvsadm -Ln | grep -q "10\.3\.7\.1:30085 "'
sleep 2.5 # a full resync changes nothing of that
ipvsadm -Ln > /tmp/ranges-ipvs.txt
check foreign-virtual-server-on-the-gone-address-kept grep -q "10\.3\.7\.5:31500 " /tmp/ranges-ipvs.txt
check gone-address-stays-gone sh -c '! grep -q "10\.3\.7\.5:30085 " /tmp/ranges-ipvs.txt'
check ranges-agent-healthy sh -c 'printf "GET /healthz HTTP/1.0\r\n\r\n" | nc -w 2 127.0.0.1 10267 | head -n 1 | grep -q " 200 "'
grep -iE "warn|error" /tmp/ranges-agent.log | tail -n 5

# --- the same while the agent is down -------------------------------------------------------------
# The address comes back, the agent programs its node port there and stops; the address goes
# while no agent runs. The new process never saw it as a node address, but no interface holds
# it, so the node port on it is the agent's, and goes; kube-proxy's stays.
write_snapshot "$TWO" "[10.3.7.0/24, 10.0.0.0/8]"
check node-port-back-on-the-returned-address wait_for 5 sh -c 'ipvsadm -Ln | grep -q "10\.3\.7\.5:30085 "'
kill "$AGENT" 2> /dev/null
wait "$AGENT" 2> /dev/null
write_snapshot "{type: InternalIP, address: 10.3.7.1}" "[10.3.7.0/24, 10.0.0.0/8]"
portpolicy agent --node-name node-a --snapshot "$SNAP" --metrics-address "$METRICS" \
    --resync-period 2s --snapshot-poll 100ms > /tmp/ranges-agent-2.log 2>&1 &
AGENT=$!
check restarted-agent-deletes-the-node-port-on-the-address-lost-while-down wait_for 20 sh -c \
    '! ipvsadm -Ln | grep -q "10\.3\.7\.5:30085 "'
ipvsadm -Ln > /tmp/ranges-ipvs.txt
check restarted-agent-keeps-the-node-port-on-the-remaining-address grep -q "10\.3\.7\.1:30085 " /tmp/ranges-ipvs.txt
check restarted-agent-keeps-the-foreign-virtual-server grep -q "10\.3\.7\.5:31500 " /tmp/ranges-ipvs.txt
grep -iE "warn|error" /tmp/ranges-agent-2.log | tail -n 5

kill "$AGENT" 2> /dev/null
wait 2> /dev/null
ipvsadm -C
nft delete table ip portpolicy 2> /dev/null
portpolicy debug dummy-sync > /dev/null 2>&1
for ns in r1 ext2; do nsip netns del "$ns" 2> /dev/null; done
finish
