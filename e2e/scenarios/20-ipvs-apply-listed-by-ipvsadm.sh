# Rules programmed through IpvsHandle::apply are listed identically by ipvsadm, an independent reader.
. /e2e/lib.sh

portpolicy debug ipvs-apply - <<'OPS' > /tmp/apply.out 2>&1
add-service TCP 10.96.0.10:80 rr
add-real TCP 10.96.0.10:80 10.0.1.2:8080 1
add-real TCP 10.96.0.10:80 10.0.2.2:8080 5
add-service UDP 10.96.0.10:53 rr
add-real UDP 10.96.0.10:53 10.0.1.2:53 1
add-service TCP 10.96.0.11:443 rr persistent 10800
add-real TCP 10.96.0.11:443 10.0.1.7:8443 1
add-service TCP [fd00::10]:80 wrr
add-real TCP [fd00::10]:80 [fd00:1::2]:8080 2
add-real TCP [fd00::10]:80 [fd00:1::3]:8080 3
add-service UDP [fd00::10]:53 rr
add-real UDP [fd00::10]:53 [fd00:1::2]:53 1
add-service SCTP 10.96.0.12:3868 rr
add-real SCTP 10.96.0.12:3868 10.0.1.9:3868 1
add-service TCP 10.96.0.13:80 rr
OPS
check apply-adds-succeed grep -q '^applied 15 of 15 operations$' /tmp/apply.out

cat > /tmp/expected.txt <<'TABLE'
TCP  10.96.0.10:80 rr
  -> 10.0.1.2:8080                Masq    1      0          0
  -> 10.0.2.2:8080                Masq    5      0          0
TCP  10.96.0.11:443 rr persistent 10800
  -> 10.0.1.7:8443                Masq    1      0          0
TCP  10.96.0.13:80 rr
UDP  10.96.0.10:53 rr
  -> 10.0.1.2:53                  Masq    1      0          0
SCTP 10.96.0.12:3868 rr
  -> 10.0.1.9:3868                Masq    1      0          0
TCP  [fd00::10]:80 wrr
  -> [fd00:1::2]:8080             Masq    2      0          0
  -> [fd00:1::3]:8080             Masq    3      0          0
UDP  [fd00::10]:53 rr
  -> [fd00:1::2]:53               Masq    1      0          0
TABLE
ipvsadm -Ln > /tmp/ipvsadm.txt
cat /tmp/ipvsadm.txt
same_table ipvsadm-lists-added-rules /tmp/expected.txt /tmp/ipvsadm.txt

portpolicy debug ipvs-apply - <<'OPS' > /tmp/apply.out 2>&1
update-service TCP 10.96.0.11:443 wrr
update-service TCP 10.96.0.10:80 rr persistent 60
update-real TCP 10.96.0.10:80 10.0.2.2:8080 0
update-real TCP [fd00::10]:80 [fd00:1::3]:8080 7
delete-real TCP [fd00::10]:80 [fd00:1::2]:8080
delete-service UDP 10.96.0.10:53
delete-service SCTP 10.96.0.12:3868
add-real TCP 10.96.0.13:80 10.0.3.3:80 1
OPS
check apply-changes-succeed grep -q '^applied 8 of 8 operations$' /tmp/apply.out

cat > /tmp/expected.txt <<'TABLE'
TCP  10.96.0.10:80 rr persistent 60
  -> 10.0.1.2:8080                Masq    1      0          0
  -> 10.0.2.2:8080                Masq    0      0          0
TCP  10.96.0.11:443 wrr
  -> 10.0.1.7:8443                Masq    1      0          0
TCP  10.96.0.13:80 rr
  -> 10.0.3.3:80                  Masq    1      0          0
TCP  [fd00::10]:80 wrr
  -> [fd00:1::3]:8080             Masq    7      0          0
UDP  [fd00::10]:53 rr
  -> [fd00:1::2]:53               Masq    1      0          0
TABLE
ipvsadm -Ln > /tmp/ipvsadm.txt
cat /tmp/ipvsadm.txt
same_table ipvsadm-lists-updated-rules /tmp/expected.txt /tmp/ipvsadm.txt
portpolicy debug ipvs-dump > /tmp/portpolicy.txt
same_table ipvs-dump-agrees-after-updates /tmp/ipvsadm.txt /tmp/portpolicy.txt
finish
