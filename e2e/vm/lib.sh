# Helpers for scenarios: `. /e2e/lib.sh` at the top of each one.
# A scenario reports each check as `PASS name` or `FAIL name: reason` and ends with `finish`.

E2E_FAILURES=0

pass() { echo "PASS $1"; }

fail() {
    echo "FAIL $1: $2"
    E2E_FAILURES=$((E2E_FAILURES + 1))
}

# check NAME COMMAND...: passes when the command succeeds; its output becomes the reason otherwise.
check() {
    name=$1
    shift
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi
}

finish() { exit "$E2E_FAILURES"; }

# `ipvsadm -Ln` and `portpolicy debug ipvs-dump` print the same table; this puts each service on
# one line with its real servers and sorts, so that only content is compared, not spacing or order.
normalize_ipvs() {
    awk '
        /^IP Virtual Server/ { next }
        /^Prot LocalAddress/ || /^  -> RemoteAddress/ { next }
        /^  ->/ { $1 = $1; dests[svc] = dests[svc] " | " $0; next }
        NF { $1 = $1; svc = $0; order[++n] = svc }
        END { for (i = 1; i <= n; i++) print order[i] dests[order[i]] }
    ' | while IFS= read -r line; do
        # Real servers within a service sorted too.
        head=${line%% | *}
        if [ "$head" = "$line" ]; then echo "$line"; continue; fi
        rest=$(echo "${line#* | }" | tr '|' '\n' | sed 's/^ *//; s/ *$//' | sort | tr '\n' '|')
        echo "$head | $rest"
    done | sort
}

# same_table NAME EXPECTED_FILE ACTUAL_FILE: compares two listings after normalizing both.
same_table() {
    normalize_ipvs < "$2" > /tmp/expected.norm
    normalize_ipvs < "$3" > /tmp/actual.norm
    if diff /tmp/expected.norm /tmp/actual.norm > /tmp/table.diff; then
        pass "$1"
    else
        fail "$1" "tables differ: $(tr '\n' ' ' < /tmp/table.diff)"
    fi
}

# pod NAME INDEX: a network namespace 10.0.INDEX.2/24 behind a veth, with the node at
# 10.0.INDEX.1, serving "pod-NAME" over HTTP on port 8080.
pod() {
    nsip netns add "$1"
    nsip link add "veth-$1" type veth peer name eth0 netns "$1"
    nsip addr add "10.0.$2.1/24" dev "veth-$1"
    nsip link set "veth-$1" up
    nsip -n "$1" link set lo up
    nsip -n "$1" addr add "10.0.$2.2/24" dev eth0
    nsip -n "$1" link set eth0 up
    nsip -n "$1" route add default via "10.0.$2.1"
    mkdir -p "/tmp/www-$1"
    echo "pod-$1" > "/tmp/www-$1/index.html"
    nsip netns exec "$1" httpd -p 8080 -h "/tmp/www-$1"
}

# http_get ADDRESS PORT: the body of GET / (busybox wget crashes in this VM; nc works).
http_get() {
    printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "$1" "$2" | tail -n 1
}
