# The latency from a cluster change to the kernel, at 10,000 Services: the real agent runs from a
# snapshot of 10,000 ClusterIP Services (one endpoint each); one EndpointSlice is rewritten N
# times, and each time two figures are taken:
# - change-to-kernel: the agent's own measure, from the change reaching its sync loop as objects
#   (where a watch event enters; here after the snapshot was re-read) to the kernel's
#   acknowledgement of the sync that applied it (netlink acks, `nft -f` done), from its log;
# - file-to-ipvsadm: from the snapshot file's rename to `ipvsadm` listing the new real server,
#   polled from outside; it adds the poll interval and re-reading the whole 10,000-Service
#   snapshot, which a watch does not do.
# p50 and p99 of both are printed (`latency ...` lines) for BENCHMARKS.md.
. /e2e/lib.sh

SERVICES=10000
ROUNDS=30
SNAP=/tmp/latency-snapshot
METRICS=127.0.0.1:10266
mkdir -p "$SNAP"
now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
# progress LINE: shown on the console as it happens (the scenario's output comes at its end).
progress() { echo "e2e: agent-latency: $*" > /dev/console 2> /dev/null || true; }

# Service i: cluster IP 10.100.(i/250).(i%250+1):80, one endpoint 10.60.(i/250).(i%250+1):8080.
# Service 0's EndpointSlice is in a file of its own, the one rewritten.
started=$(now_ms)
awk -v n="$SERVICES" 'BEGIN {
    print "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 10.1.0.1}]}"
    for (i = 0; i < n; i++) {
        ip = int(i / 250) "." (i % 250 + 1)
        printf "---\napiVersion: v1\nkind: Service\nmetadata: {name: s%d, namespace: lat, labels: {service.kubernetes.io/service-proxy-name: portpolicy}}\nspec: {type: ClusterIP, clusterIP: 10.100.%s, ports: [{name: p, port: 80, targetPort: 8080}]}\n", i, ip
        if (i > 0)
            printf "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s%d-1, namespace: lat, labels: {kubernetes.io/service-name: s%d}}\naddressType: IPv4\nports: [{name: p, port: 8080, protocol: TCP}]\nendpoints: [{addresses: [10.60.%s], nodeName: node-a, conditions: {ready: true}}]\n", i, i, ip
    }
}' > "$SNAP/cluster.yaml"
# slice0 ADDRESS: service 0's EndpointSlice with one endpoint, written beside the snapshot
# directory (so no poll sees half a file), then renamed into it.
slice0() {
    printf 'apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s0-1, namespace: lat, labels: {kubernetes.io/service-name: s0}}\naddressType: IPv4\nports: [{name: p, port: 8080, protocol: TCP}]\nendpoints: [{addresses: [%s], nodeName: node-a, conditions: {ready: true}}]\n' "$1" \
        > /tmp/slice0.new
    mv /tmp/slice0.new "$SNAP/slice0.yaml"
}
slice0 10.61.0.1
echo "snapshot of $SERVICES Services: $(du -k "$SNAP/cluster.yaml" | cut -f1) KiB, written in $(( $(now_ms) - started )) ms"
progress "snapshot written after $(( $(now_ms) - started )) ms"

# A resync period longer than the run: every sync measured is the change's own.
started=$(now_ms)
portpolicy agent --node-name node-a --snapshot "$SNAP" --metrics-address "$METRICS" \
    --resync-period 1h --snapshot-poll 20ms > /tmp/latency-agent.log 2>&1 &
AGENT=$!
i=0
until [ "$(printf 'GET /readyz HTTP/1.0\r\n\r\n' | nc -w 1 127.0.0.1 10266 2>/dev/null | head -n 1 | awk '{ print $2 }')" = 200 ]; do
    i=$((i + 1))
    if [ $i -gt 1200 ] || ! kill -0 "$AGENT" 2> /dev/null; then break; fi
    sleep 0.1
done
echo "agent ready (first full sync of $SERVICES Services) after $(( $(now_ms) - started )) ms"
progress "agent ready after $(( $(now_ms) - started )) ms"
virtual=$(ipvsadm -Ln | grep -c '^TCP ')
[ "$virtual" -ge "$SERVICES" ] && pass latency-agent-programs-every-service \
    || { fail latency-agent-programs-every-service "$virtual virtual servers"; tail -n 5 /tmp/latency-agent.log; }

# Each round gives service 0 a new endpoint and waits for the kernel to list it.
: > /tmp/latency-external
missed=0
round=1
while [ $round -le "$ROUNDS" ]; do
    address="10.61.$((round / 250)).$((round % 250 + 1))"
    before=$(grep -c change_to_kernel_ms /tmp/latency-agent.log)
    t0=$(now_ms)
    slice0 "$address"
    k=0
    until ipvsadm -Ln -t 10.100.0.1:80 2> /dev/null | grep -q " $address:8080 "; do
        k=$((k + 1))
        if [ $k -gt 1000 ]; then break; fi
        sleep 0.01
    done
    if [ $k -gt 1000 ]; then
        missed=$((missed + 1))
    else
        echo $(( $(now_ms) - t0 )) >> /tmp/latency-external
    fi
    # The agent logs the sync after the kernel acknowledged it: wait for that line too.
    k=0
    while [ "$(grep -c change_to_kernel_ms /tmp/latency-agent.log)" -le "$before" ] && [ $k -lt 500 ]; do
        k=$((k + 1))
        sleep 0.01
    done
    progress "round $round: $(tail -n 1 /tmp/latency-external) ms; $(grep change_to_kernel_ms /tmp/latency-agent.log | tail -n 1 | sed -n 's/.*\(change_to_kernel_ms=[0-9.]*\).*/\1/p'); $(grep 'snapshot loaded' /tmp/latency-agent.log | tail -n 1 | sed -n 's/.*\(load_ms=[0-9.]*\).*/\1/p')"
    round=$((round + 1))
done
[ "$missed" = 0 ] && pass latency-every-change-reaches-the-kernel \
    || fail latency-every-change-reaches-the-kernel "$missed of $ROUNDS changes not listed within 10 s"

# percentiles FILE: "p50 P50 p99 P99 n N" over one number a line (nearest rank).
percentiles() {
    sort -n "$1" | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "none"; exit }
        r50 = int((NR * 50 + 99) / 100); r99 = int((NR * 99 + 99) / 100)
        printf "p50 %s p99 %s max %s n %d", v[r50], v[r99], v[NR], NR }'
}
# Only the syncs that applied a change, not the start-up ones.
grep change_to_kernel_ms /tmp/latency-agent.log | sed 1d \
    | sed -n 's/.*change_to_kernel_ms=\([0-9.]*\).*/\1/p' > /tmp/latency-internal
grep "snapshot loaded" /tmp/latency-agent.log | sed 1d \
    | sed -n 's/.*load_ms=\([0-9.]*\).*/\1/p' > /tmp/latency-load
echo "latency change-to-kernel ms (agent, $SERVICES Services): $(percentiles /tmp/latency-internal)"
echo "latency snapshot-reread ms ($SERVICES Services): $(percentiles /tmp/latency-load)"
echo "latency file-to-ipvsadm ms ($SERVICES Services, poll 20 ms): $(percentiles /tmp/latency-external)"
count=$(wc -l < /tmp/latency-internal)
[ "$count" -ge "$ROUNDS" ] && pass latency-agent-reports-each-change \
    || fail latency-agent-reports-each-change "$count of $ROUNDS syncs logged a change-to-kernel latency"
check latency-metric-exported sh -c \
    "printf 'GET /metrics HTTP/1.0\r\n\r\n' | nc -w 2 127.0.0.1 10266 | grep -q '^portpolicy_agent_change_to_kernel_seconds_count [1-9]'"
tail -n 3 /tmp/latency-agent.log

kill "$AGENT" 2> /dev/null
wait 2> /dev/null
started=$(now_ms)
ipvsadm -C
nft delete table ip portpolicy 2> /dev/null
nsip link del portpolicy-ipvs 2> /dev/null
echo "cleaned up in $(( $(now_ms) - started )) ms"
finish
