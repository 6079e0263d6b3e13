# The real agent, run from a cluster snapshot, against real traffic between network namespaces:
# cluster IPs spread over ready endpoints, node ports honour the external traffic policy (and
# keep or masquerade the client address accordingly), the health-check node port follows the
# local endpoints, one endpoint change is one or two netlink operations, and a restart rewrites
# nothing and keeps a live connection.
. /e2e/lib.sh
# A dead connection must fail a check, not kill this shell on write.
trap "" PIPE

SNAP=/tmp/agent-snapshot
METRICS=127.0.0.1:10265
mkdir -p "$SNAP"

# Pods answer /cgi-bin/who with their name and the client address they see.
cgi_pod() {
    pod "$1" "$2"
    mkdir -p "/tmp/www-$1/cgi-bin"
    printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "pod-%s $REMOTE_ADDR"\n' "$1" \
        > "/tmp/www-$1/cgi-bin/who"
    chmod +x "/tmp/www-$1/cgi-bin/who"
}
# ep ADDRESS NODE [READY]: one EndpointSlice endpoint.
ep() {
    printf '  - {addresses: [%s], nodeName: %s, conditions: {ready: %s}}\n' "$1" "$2" "${3:-true}"
}
service() { # NAME TYPE CLUSTER_IP PORT TARGET [NODE_PORT] [EXTRA_SPEC] [ANNOTATIONS]
    cat <<EOF
---
apiVersion: v1
kind: Service
metadata:
  name: $1
  namespace: shop
  labels: {service.kubernetes.io/service-proxy-name: portpolicy}
  annotations: {${8:-}}
spec:
  type: $2
  clusterIP: $3
  ports: [{name: p, port: $4, targetPort: $5${6:+, nodePort: $6}}]
  ${7:-}
EOF
}
slice() { # SERVICE PORT ENDPOINTS...
    name=$1 port=$2
    shift 2
    cat <<EOF
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: $name-1
  namespace: shop
  labels: {kubernetes.io/service-name: $name}
addressType: IPv4
ports: [{name: p, port: $port, protocol: TCP}]
endpoints:
EOF
    for e in "$@"; do echo "$e"; done
}
# write_snapshot LOCAL_WEB_ENDPOINTS API_ENDPOINTS (each a newline-separated list of `ep` lines)
write_snapshot() {
    {
        printf 'apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus:\n  addresses: [{type: InternalIP, address: 10.1.0.1}]\n'
        service web NodePort 10.96.0.10 80 8080 30080
        slice web 8080 "$(ep 10.0.11.2 node-a)" "$(ep 10.0.12.2 node-a)" "$(ep 10.0.13.2 node-b)" \
            "$(ep 10.0.14.2 node-a false)"
        service local-web LoadBalancer 10.96.0.11 80 8080 30081 "externalTrafficPolicy: Local
  healthCheckNodePort: 30090"
        slice local-web 8080 "$1"
        service legacy-local NodePort 10.96.0.12 80 8080 30082 "" \
            "service.beta.kubernetes.io/external-traffic: OnlyLocal"
        slice legacy-local 8080 "$(ep 10.0.11.2 node-a)" "$(ep 10.0.13.2 node-b)"
        service api ClusterIP 10.96.0.20 80 8080
        slice api 8080 "$2"
        service echo ClusterIP 10.96.0.30 9000 9000
        slice echo 9000 "$(ep 10.0.15.2 node-a)"
    } > "$SNAP/cluster.yaml.new"
    mv "$SNAP/cluster.yaml.new" "$SNAP/cluster.yaml"
}

metric_sum() { # the sum of a metric's samples
    printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc -w 2 127.0.0.1 10265 \
        | awk -v m="$1" 'index($1, m) == 1 { s += $2; n++ } END { if (n) print s; else print "unreachable" }'
}
http_status() { # ADDRESS PORT -> status code
    printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "$1" "$2" | head -n 1 | awk '{ print $2 }'
}
# busybox httpd listens on IPv6 too and reports IPv4 clients as [::ffff:a.b.c.d].
unmap() { sed 's/\[::ffff:\([0-9.]*\)\]/\1/'; }
who() { printf 'GET /cgi-bin/who HTTP/1.0\r\n\r\n' | nc -w 2 "$1" "$2" | tail -n 1 | unmap; }
ext_who() {
    nsip netns exec ext sh -c "printf 'GET /cgi-bin/who HTTP/1.0\r\n\r\n' | nc -w 2 $1 $2 | tail -n 1" | unmap
}
# answers N FUNCTION ARGS...: the distinct answers (pod and seen address) of N requests, sorted.
answers() {
    n=$1
    shift
    i=0
    while [ $i -lt "$n" ]; do "$@"; echo; i=$((i + 1)); done | sed '/^$/d' | sort -u | tr '\n' ' '
}
start_agent() {
    portpolicy agent --node-name node-a --snapshot "$SNAP" --metrics-address "$METRICS" \
        --resync-period 5s --snapshot-poll 200ms > /tmp/agent.log 2>&1 &
    AGENT=$!
    i=0
    until [ "$(printf 'GET /readyz HTTP/1.0\r\n\r\n' | nc -w 1 127.0.0.1 10265 2>/dev/null | head -n 1 | awk '{ print $2 }')" = 200 ]; do
        i=$((i + 1))
        if [ $i -gt 100 ]; then
            cat /tmp/agent.log
            return 1
        fi
        sleep 0.1
    done
}
table_without_counters() {
    awk '/^(TCP|UDP|SCTP) / { svc = $1 " " $2 " " $3; print svc; next }
         /^  -> / && $2 != "RemoteAddress:Port" { print svc " -> " $2 " " $3 " " $4 }' | sort
}

# --- the node and its pods (subnets 10.0.11-15, clear of other scenarios' pods) --------------------------------------------------------------------
cgi_pod a1 11     # node-a
cgi_pod a2 12     # node-a
cgi_pod b3 13     # "node-b": a remote endpoint, reachable from here like any pod network
cgi_pod a4 14     # node-a, never ready
pod e5 15         # the echo server of the long-lived connection
# Its stdin never ends, or nc would close the connection when it reads EOF.
nsip netns exec e5 sh -c 'sleep 600 | nc -l -p 9000 > /tmp/echo-received 2>&1 &'
# An external client on its own network; the node's address there is its InternalIP.
nsip netns add ext
nsip link add veth-ext type veth peer name eth0 netns ext
nsip addr add 10.1.0.1/24 dev veth-ext
nsip link set veth-ext up
nsip -n ext link set lo up
nsip -n ext addr add 10.1.0.2/24 dev eth0
nsip -n ext link set eth0 up
nsip -n ext route add default via 10.1.0.1

LOCAL_BOTH="$(ep 10.0.11.2 node-a)
$(ep 10.0.12.2 node-a)
$(ep 10.0.13.2 node-b)"
write_snapshot "$LOCAL_BOTH" "$(ep 10.0.11.2 node-a)"

started=$(awk '{ printf "%d", $1 * 1000 }' /proc/uptime)
# Not through `check`: that runs its command in a subshell, and $AGENT must survive.
if start_agent; then pass agent-starts-and-gets-ready; else fail agent-starts-and-gets-ready "not ready in 10 s"; fi
echo "agent ready after $(( $(awk '{ printf "%d", $1 * 1000 }' /proc/uptime) - started )) ms"

# --- node plumbing ----------------------------------------------------------------------------
check sysctls-set sh -c '[ "$(cat /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/vs/conntrack /proc/sys/net/ipv4/vs/expire_nodest_conn /proc/sys/net/ipv4/vs/expire_quiescent_template | tr -d "\n")" = 1111 ]'
check node-ports-reserved sh -c 'grep -q "30080-30082" /proc/sys/net/ipv4/ip_local_reserved_ports && grep -q 30090 /proc/sys/net/ipv4/ip_local_reserved_ports'
check vips-on-dummy sh -c 'nsip -4 addr show dev portpolicy-ipvs | grep -q "10.96.0.30/32"'
nft list table ip portpolicy > /tmp/nft.txt 2>&1
grep -A 3 "set external-cluster" /tmp/nft.txt
check nft-table-present grep -qE "10\.1\.0\.1 \. (tcp|6) \. 30080" /tmp/nft.txt

# --- the kernel holds exactly the plan --------------------------------------------------------
portpolicy agent --node-name node-a --snapshot "$SNAP" --print-table > /tmp/planned.txt
ipvsadm -Ln > /tmp/kernel.txt
table_without_counters < /tmp/planned.txt > /tmp/planned.norm
table_without_counters < /tmp/kernel.txt > /tmp/kernel.norm
cat /tmp/kernel.txt
if [ -s /tmp/planned.norm ] && diff /tmp/planned.norm /tmp/kernel.norm > /tmp/plan.diff; then
    pass ipvsadm-lists-exactly-the-plan
else
    fail ipvsadm-lists-exactly-the-plan "$(tr '\n' ' ' < /tmp/plan.diff)"
fi

# --- cluster IP -------------------------------------------------------------------------------
got=$(answers 9 who 10.96.0.10 80)
echo "cluster IP from the node: $got"
# Node-local clients are masqueraded: each pod sees the node's address on its own link.
[ "$got" = "pod-a1 10.0.11.1 pod-a2 10.0.12.1 pod-b3 10.0.13.1 " ] \
    && pass cluster-ip-spreads-over-ready-endpoints-only || fail cluster-ip-spreads-over-ready-endpoints-only "$got"

# --- node ports from outside ------------------------------------------------------------------
got=$(answers 9 ext_who 10.1.0.1 30080)
echo "Cluster policy node port: $got"
[ "$got" = "pod-a1 10.0.11.1 pod-a2 10.0.12.1 pod-b3 10.0.13.1 " ] \
    && pass cluster-policy-node-port-reaches-all-endpoints-masqueraded \
    || fail cluster-policy-node-port-reaches-all-endpoints-masqueraded "$got"
got=$(answers 8 ext_who 10.1.0.1 30081)
echo "Local policy node port: $got"
[ "$got" = "pod-a1 10.1.0.2 pod-a2 10.1.0.2 " ] \
    && pass local-policy-node-port-reaches-local-endpoints-with-client-address \
    || fail local-policy-node-port-reaches-local-endpoints-with-client-address "$got"
got=$(answers 4 ext_who 10.1.0.1 30082)
echo "OnlyLocal annotation node port: $got"
[ "$got" = "pod-a1 10.1.0.2 " ] \
    && pass only-local-annotation-keeps-traffic-local || fail only-local-annotation-keeps-traffic-local "$got"

# --- health-check node port -------------------------------------------------------------------
check health-check-200-with-two-local-endpoints wait_for 5 sh -c \
    'printf "GET /healthz HTTP/1.0\r\n\r\n" | nc -w 2 10.1.0.1 30090 > /tmp/hc.txt; head -n 1 /tmp/hc.txt | grep -q " 200 " && grep -q "\"localEndpoints\":2" /tmp/hc.txt && grep -qi "^X-Load-Balancing-Endpoint-Weight: 2" /tmp/hc.txt'
cat /tmp/hc.txt

# --- a long-lived connection, one endpoint change, a restart ----------------------------------
mkfifo /tmp/echo-in
nc 10.96.0.30 9000 < /tmp/echo-in > /dev/null 2>&1 &
CLIENT=$!
exec 3> /tmp/echo-in
echo first >&3
check long-lived-connection-open wait_for 5 grep -q first /tmp/echo-received

ops_before=$(metric_sum portpolicy_agent_ipvs_operations_total)
write_snapshot "$LOCAL_BOTH" "$(ep 10.0.11.2 node-a)
$(ep 10.0.12.2 node-a)"
check endpoint-change-applied wait_for 5 sh -c 'ipvsadm -Ln -t 10.96.0.20:80 | grep -q 10.0.12.2:8080'
sleep 0.5
ops_after=$(metric_sum portpolicy_agent_ipvs_operations_total)
delta=$((ops_after - ops_before))
echo "netlink operations for one endpoint change: $delta ($ops_before before, $ops_after after)"
[ "$delta" -ge 1 ] && [ "$delta" -le 2 ] && pass one-endpoint-change-is-one-or-two-operations \
    || fail one-endpoint-change-is-one-or-two-operations "$delta operations"
echo second >&3
check other-connections-untouched-by-the-change wait_for 5 grep -q second /tmp/echo-received

ipvsadm -Ln | table_without_counters > /tmp/before-restart.norm
kill -9 "$AGENT"
wait "$AGENT" 2> /dev/null
ipvsadm -Ln | table_without_counters > /tmp/stopped.norm
check stopping-leaves-the-table-in-place cmp -s /tmp/before-restart.norm /tmp/stopped.norm
if start_agent; then pass agent-restarts; else fail agent-restarts "not ready in 10 s"; fi
sleep 0.5
# A counter with no sample yet is absent: count what the restarted agent sent, if anything.
restart_ops=$(printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc -w 2 127.0.0.1 10265 \
    | awk '/^portpolicy_agent_full_syncs_total / { up = 1 } /^portpolicy_agent_ipvs_operations_total/ { s += $2 }
           END { if (up) print s + 0; else print "unreachable" }')
[ "$restart_ops" = 0 ] && pass restart-rewrites-nothing || fail restart-rewrites-nothing "$restart_ops operations"
ipvsadm -Ln | table_without_counters > /tmp/after-restart.norm
check restart-keeps-the-table cmp -s /tmp/before-restart.norm /tmp/after-restart.norm
echo third >&3
check long-lived-connection-survives-restart wait_for 5 grep -q third /tmp/echo-received

# --- local endpoints go away ------------------------------------------------------------------
write_snapshot "$(ep 10.0.13.2 node-b)" "$(ep 10.0.11.2 node-a)
$(ep 10.0.12.2 node-a)"
check health-check-503-without-local-endpoints wait_for 5 sh -c \
    'printf "GET / HTTP/1.0\r\n\r\n" | nc -w 2 10.1.0.1 30090 > /tmp/hc.txt; head -n 1 /tmp/hc.txt | grep -q " 503 " && grep -q "\"localEndpoints\":0" /tmp/hc.txt'
cat /tmp/hc.txt
got=$(answers 3 ext_who 10.1.0.1 30081)
echo "Local policy node port without local endpoints: '$got'"
[ -z "$(echo "$got" | tr -d ' ')" ] && pass local-policy-drops-without-local-endpoints \
    || fail local-policy-drops-without-local-endpoints "$got"
got=$(answers 6 ext_who 10.1.0.1 30080)
[ "$got" = "pod-a1 10.0.11.1 pod-a2 10.0.12.1 pod-b3 10.0.13.1 " ] \
    && pass cluster-policy-unaffected || fail cluster-policy-unaffected "$got"

# --- nftables: the sets follow each change, the table itself stays --------------------------
# The chains' rule handles change only if the table is deleted and recreated.
nft -a list chain ip portpolicy postrouting | grep -o "# handle [0-9]*" > /tmp/handles-before
write_snapshot "$(ep 10.0.13.2 node-b)" "$(ep 10.0.11.2 node-a)
$(ep 10.0.16.2 node-a)"
check nft-hairpin-set-gains-the-new-endpoint wait_for 5 sh -c \
    'nft list set ip portpolicy hairpin | grep -qE "10\.0\.16\.2 \. (tcp|6) \. 8080 \. 10\.0\.16\.2"'
write_snapshot "$(ep 10.0.13.2 node-b)" "$(ep 10.0.11.2 node-a)"
check nft-hairpin-set-loses-the-removed-endpoint wait_for 5 sh -c \
    '! nft list set ip portpolicy hairpin | grep -q "10\.0\.16\.2 "'
sleep 6 # a full resync (every 5 s here) refills the sets
planned=$(portpolicy agent --node-name node-a --snapshot "$SNAP" --print-table | grep -cE '^(TCP|UDP|SCTP) ')
in_set=$(nft list set ip portpolicy virtual-servers | grep -oE '[0-9.]+ \. (tcp|udp|sctp|6|17|132) \. [0-9]+' | sort -u | wc -l)
echo "virtual servers planned: $planned; in the nftables set: $in_set"
[ "$planned" -gt 0 ] && [ "$planned" = "$in_set" ] && pass nft-virtual-servers-set-holds-the-plan \
    || fail nft-virtual-servers-set-holds-the-plan "$in_set elements for $planned virtual servers"
check nft-cluster-ips-set-holds-the-api-service sh -c \
    'nft list set ip portpolicy cluster-ips | grep -qE "10\.96\.0\.20 \. (tcp|6) \. 80"'
nft -a list chain ip portpolicy postrouting | grep -o "# handle [0-9]*" > /tmp/handles-after
check nft-table-not-replaced-by-changes-or-resyncs cmp -s /tmp/handles-before /tmp/handles-after

check agent-healthy sh -c 'printf "GET /healthz HTTP/1.0\r\n\r\n" | nc -w 2 127.0.0.1 10265 | head -n 1 | grep -q " 200 "'
grep -c . /tmp/agent.log > /dev/null && tail -n 5 /tmp/agent.log

# --- clean up ---------------------------------------------------------------------------------
exec 3>&-
kill "$CLIENT" "$AGENT" 2> /dev/null
wait 2> /dev/null
nft delete table ip portpolicy 2> /dev/null
nft delete table ip6 portpolicy 2> /dev/null
portpolicy debug dummy-sync > /dev/null 2>&1
for ns in a1 a2 b3 a4 e5 ext; do nsip netns del "$ns" 2> /dev/null; done
finish
