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

# linked_ns NS LINK ADDRESS GATEWAY [PARENT]: a network namespace NS whose eth0 holds
# ADDRESS/24, the other end of a veth named LINK in PARENT (the root namespace when not given)
# that holds GATEWAY/24 and is NS's default route.
linked_ns() {
    nsip netns add "$1"
    parent=""
    [ -n "${5:-}" ] && parent="-n $5"
    # shellcheck disable=SC2086 # $parent is an option and its value, or nothing
    {
        nsip $parent link add "$2" type veth peer name eth0 netns "$1"
        nsip $parent addr add "$4/24" dev "$2"
        nsip $parent link set "$2" up
    }
    nsip -n "$1" link set lo up
    nsip -n "$1" addr add "$3/24" dev eth0
    nsip -n "$1" link set eth0 up
    nsip -n "$1" route add default via "$4"
}

# who_script NAME: /tmp/www-NAME/cgi-bin/who, answering with "pod-NAME CLIENT_ADDRESS".
who_script() {
    mkdir -p "/tmp/www-$1/cgi-bin"
    printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "pod-%s $REMOTE_ADDR"\n' "$1" \
        > "/tmp/www-$1/cgi-bin/who"
    chmod +x "/tmp/www-$1/cgi-bin/who"
}

# wait_for SECONDS COMMAND...: retries the command every 0.2 s until it succeeds.
wait_for() {
    limit=$(($1 * 5))
    shift
    i=0
    until "$@" > /dev/null 2>&1; do
        i=$((i + 1))
        [ $i -ge $limit ] && return 1
        sleep 0.2
    done
}

# pod NAME INDEX: a network namespace 10.0.INDEX.2/24 behind a veth, with the node at
# 10.0.INDEX.1, serving "pod-NAME" over HTTP on port 8080.
pod() {
    linked_ns "$1" "veth-$1" "10.0.$2.2" "10.0.$2.1"
    mkdir -p "/tmp/www-$1"
    echo "pod-$1" > "/tmp/www-$1/index.html"
    nsip netns exec "$1" httpd -p 8080 -h "/tmp/www-$1"
}

# http_get ADDRESS PORT: the body of GET / (busybox wget crashes in this VM; nc works).
http_get() {
    printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "$1" "$2" | tail -n 1
}
