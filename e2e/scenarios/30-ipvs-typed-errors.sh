# The kernel's refusals come back per operation with their errno name, and do not stop the batch.
. /e2e/lib.sh

ipvsadm -A -t 10.96.0.20:80 -s rr
ipvsadm -a -t 10.96.0.20:80 -r 10.0.1.2:80 -m -w 1

portpolicy debug ipvs-apply - <<'OPS' > /tmp/apply.out 2>&1
add-service TCP 10.96.0.20:80 rr
add-service TCP 10.96.0.21:80 rr
add-real TCP 10.96.0.20:80 10.0.1.2:80 1
delete-real TCP 10.96.0.20:80 10.0.9.9:80
delete-service TCP 10.96.0.99:80
add-real TCP 10.96.0.21:80 10.0.1.3:80 1
add-service TCP 10.96.0.22:80 nosuch
add-service TCP 10.96.0.23:80 scheduler-name-too-long
OPS
status=$?
cat /tmp/apply.out
[ $status -ne 0 ] && pass apply-exits-non-zero-on-refusal || fail apply-exits-non-zero-on-refusal "exit 0"
check existing-service-is-EEXIST grep -q '^failed EEXIST: add service TCP 10.96.0.20:80 (rr)$' /tmp/apply.out
check existing-real-server-is-EEXIST grep -q '^failed EEXIST: add real server 10.0.1.2:80 weight 1 to TCP 10.96.0.20:80$' /tmp/apply.out
check missing-real-server-is-ENOENT grep -q '^failed ENOENT: delete real server 10.0.9.9:80' /tmp/apply.out
check missing-service-is-ESRCH grep -q '^failed ESRCH: delete service TCP 10.96.0.99:80$' /tmp/apply.out
check unknown-scheduler-is-ENOENT grep -q '^failed ENOENT: add service TCP 10.96.0.22:80 (nosuch)$' /tmp/apply.out
# Longer than IP_VS_SCHEDNAME_MAXLEN: the attribute policy rejects it before any lookup.
check overlong-scheduler-name-is-EINVAL grep -q '^failed EINVAL: add service TCP 10.96.0.23:80' /tmp/apply.out
check other-operations-still-applied grep -q '^applied 2 of 8 operations$' /tmp/apply.out
ipvsadm -Ln > /tmp/ipvsadm.txt
check batch-continued-after-errors grep -q -- '-> 10.0.1.3:80' /tmp/ipvsadm.txt
finish
