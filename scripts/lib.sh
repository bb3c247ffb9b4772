# Shared by scripts/test.sh and scripts/demo.sh: free ports on loopback.
#
# Ports are drawn at random below the kernel's ephemeral range (which outgoing
# connections take) and probed, so that several checkouts on one machine can
# run side by side.
PORT_LOW=20000
EPHEMERAL_LOW="$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
PORT_SPAN=$((EPHEMERAL_LOW > PORT_LOW + 1000 ? EPHEMERAL_LOW - PORT_LOW : 10000))

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

taken_ports=" "
# free_port VAR: sets VAR to a free port not handed out before in this shell.
# (It assigns rather than prints, so that the taken list survives: a command
# substitution would run it in a subshell and forget.)
free_port() {
    local port tries
    for tries in $(seq 1 200); do
        port=$((PORT_LOW + (RANDOM * 32768 + RANDOM) % PORT_SPAN))
        if [[ "$taken_ports" != *" $port "* ]] && ! port_open "$port"; then
            taken_ports+="$port "
            printf -v "$1" '%s' "$port"
            return 0
        fi
    done
    echo "no free port after $tries tries" >&2
    return 1
}
