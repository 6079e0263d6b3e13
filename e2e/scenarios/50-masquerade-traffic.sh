# Traffic through a virtual server programmed by portpolicy (not ipvsadm): a client on the node
# reaches two pods in turn through a VIP on the dummy interface, masqueraded by NAT.
. /e2e/lib.sh

echo 1 > /proc/sys/net/ipv4/ip_forward
echo 1 > /proc/sys/net/ipv4/vs/conntrack
pod p1 1
pod p2 2
# Node-local clients must be masqueraded or the pods answer the VIP itself (see e2e/README.md).
nft -f - <<'NFT'
table ip e2e {
    chain postrouting {
        type nat hook postrouting priority 100;
        ip daddr 10.0.0.0/16 masquerade
    }
}
NFT

check vip-on-dummy portpolicy debug dummy-sync 10.96.0.40
check virtual-server-programmed portpolicy debug ipvs-apply - <<'OPS'
add-service TCP 10.96.0.40:80 rr
add-real TCP 10.96.0.40:80 10.0.1.2:8080 1
add-real TCP 10.96.0.40:80 10.0.2.2:8080 1
OPS

answers=""
for i in 1 2 3 4 5 6; do
    answers="$answers $(http_get 10.96.0.40 80)"
done
echo "answers:$answers"
case "$answers" in
    " pod-p1 pod-p2 pod-p1 pod-p2 pod-p1 pod-p2" | " pod-p2 pod-p1 pod-p2 pod-p1 pod-p2 pod-p1")
        pass round-robin-alternates-between-pods ;;
    *) fail round-robin-alternates-between-pods "got:$answers" ;;
esac

# Weight 0 drains a real server: new connections all go to the other pod.
portpolicy debug ipvs-apply - > /dev/null <<'OPS'
update-real TCP 10.96.0.40:80 10.0.1.2:8080 0
OPS
answers=""
for i in 1 2 3 4; do
    answers="$answers $(http_get 10.96.0.40 80)"
done
[ "$answers" = " pod-p2 pod-p2 pod-p2 pod-p2" ] && pass weight-zero-drains-real-server \
    || fail weight-zero-drains-real-server "got:$answers"

portpolicy debug ipvs-dump > /tmp/dump.txt
cat /tmp/dump.txt
# Connection counters come back from the kernel: p2 served 7 connections, still in TIME_WAIT.
check dump-reports-connection-counters sh -c \
    "grep -F -- '-> 10.0.2.2:8080' /tmp/dump.txt | awk '{ exit !(\$5 + \$6 >= 1) }'"

nft delete table ip e2e
portpolicy debug dummy-sync > /dev/null
finish
