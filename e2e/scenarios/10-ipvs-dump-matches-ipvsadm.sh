# A table built with ipvsadm is listed by `portpolicy debug ipvs-dump` exactly as ipvsadm lists it.
. /e2e/lib.sh

ipvsadm -A -t 10.96.0.1:80 -s rr
ipvsadm -a -t 10.96.0.1:80 -r 10.0.1.2:8080 -m -w 1
ipvsadm -a -t 10.96.0.1:80 -r 10.0.2.2:8080 -m -w 4
ipvsadm -A -u 10.96.0.2:53 -s wrr -p 600
ipvsadm -a -u 10.96.0.2:53 -r 10.0.1.3:5353 -m -w 2
ipvsadm -A -t [fd00::1]:443 -s rr
ipvsadm -a -t [fd00::1]:443 -r [fd00:1::2]:8443 -m -w 3
ipvsadm -a -t [fd00::1]:443 -r [fd00:1::3]:8443 -m -w 0
ipvsadm -A --sctp-service 10.96.0.3:9 -s sh
ipvsadm -A -u [fd00::2]:53 -s rr -p 30

ipvsadm -Ln > /tmp/ipvsadm.txt
if portpolicy debug ipvs-dump > /tmp/portpolicy.txt; then
    pass ipvs-dump-runs
else
    fail ipvs-dump-runs "$(cat /tmp/portpolicy.txt)"
fi
cat /tmp/portpolicy.txt
same_table ipvs-dump-equals-ipvsadm /tmp/ipvsadm.txt /tmp/portpolicy.txt
if [ "$(head -n 1 /tmp/ipvsadm.txt)" = "$(head -n 1 /tmp/portpolicy.txt)" ]; then
    pass ipvs-info-equals-ipvsadm
else
    fail ipvs-info-equals-ipvsadm "$(head -n 1 /tmp/portpolicy.txt) vs $(head -n 1 /tmp/ipvsadm.txt)"
fi
# Not only equal after normalizing: a real-server line is byte-identical.
grep -F -- '-> 10.0.2.2:8080' /tmp/ipvsadm.txt > /tmp/a.line
grep -F -- '-> 10.0.2.2:8080' /tmp/portpolicy.txt > /tmp/b.line
check ipvs-dump-real-server-line-byte-identical cmp /tmp/a.line /tmp/b.line
finish
