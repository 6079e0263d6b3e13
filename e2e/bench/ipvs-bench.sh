# Programming S virtual servers with S*R real servers from empty: portpolicy's batched netlink
# against `ipvsadm -R` restoring the same rules, in the same VM. Parameters come from the kernel
# command line (e2e.services, e2e.reals).
#
# Order matters: the kernel parks every deleted real server in a trash list for 2-4 minutes
# (IP_VS_DEST_TRASH_PERIOD) and every real-server add walks that list, so adds right after a
# mass delete are ~10x slower. Each contender therefore starts on a kernel with an empty trash:
# portpolicy on the fresh one, ipvsadm after waiting the trash out.
. /e2e/lib.sh

arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^e2e.$1=//p"; }
S=$(arg services)
R=$(arg reals)
now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }

portpolicy debug ipvs-bench --services "$S" --reals-per-service "$R" > /tmp/bench.out 2>&1
status=$?
sed 's/^bench /BENCH portpolicy-/' /tmp/bench.out
[ $status -eq 0 ] && pass ipvs-bench-completes || fail ipvs-bench-completes "$(tail -n 1 /tmp/bench.out)"

portpolicy debug ipvs-bench --services "$S" --reals-per-service "$R" --write-ipvsadm-rules /tmp/rules
echo "bench: waiting 250 s for the kernel's real-server trash to empty before ipvsadm's turn"
sleep 250
t0=$(now_ms)
ipvsadm -R < /tmp/rules
t1=$(now_ms)
restore_ms=$((t1 - t0))
services=$(ipvsadm -Ln | grep -c '^TCP')
reals=$(( $(ipvsadm -Ln | grep -c -- '->') - 1 ))
echo "BENCH ipvsadm-restore: $services services + $reals real servers ($(wc -l < /tmp/rules) rules) in $restore_ms ms"
[ "$services" -eq "$S" ] && [ "$reals" -eq $((S * R)) ] && pass ipvsadm-restore-complete \
    || fail ipvsadm-restore-complete "$services services, $reals real servers"
t0=$(now_ms)
ipvsadm -e -t 10.96.0.0:80 -r 10.128.0.0:8080 -m -w 2
t1=$(now_ms)
echo "BENCH ipvsadm-change: one real-server change (one ipvsadm run) in $((t1 - t0)) ms"
t0=$(now_ms)
ipvsadm -C
t1=$(now_ms)
echo "BENCH ipvsadm-clear: $((t1 - t0)) ms"

program_ms=$(awk '/^bench program:/ { printf "%d", $12 * 1000 }' /tmp/bench.out)
change_ms=$(awk '/^bench change:/ { print $10 }' /tmp/bench.out)
echo "BENCH ratio: ipvsadm -R took $restore_ms ms, portpolicy $program_ms ms"
if [ -n "$program_ms" ] && [ "$program_ms" -lt "$restore_ms" ]; then
    pass portpolicy-faster-than-ipvsadm-restore
else
    fail portpolicy-faster-than-ipvsadm-restore "portpolicy ${program_ms:-?} ms, ipvsadm -R $restore_ms ms"
fi
# The median: the very first change also pays for qemu translating that kernel path once.
if [ -n "$change_ms" ] && awk -v ms="$change_ms" 'BEGIN { exit !(ms < 10) }'; then
    pass one-change-under-10ms
else
    fail one-change-under-10ms "median ${change_ms:-?} ms"
fi
finish
