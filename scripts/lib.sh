# Shared by scripts/test.sh and scripts/demo.sh: free ports on loopback, and
# Mosquitto (installed with apt-get when missing, started on a free port).
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

# apt_install PACKAGE...: installs Debian packages (as root). The package
# lists are refreshed only when the install fails on them (a fresh machine
# has none; a second call right after the first needs no refresh).
apt_install() {
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "missing $*: install them (apt-get install $*)" >&2
        return 1
    fi
    echo "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; then
        apt-get update -q >/dev/null || { echo "apt-get update failed" >&2; return 1; }
        apt-get install -y -q --no-install-recommends "$@" >/dev/null ||
            { echo "apt-get install $* failed" >&2; return 1; }
    fi
}

# ensure_mosquitto: installs mosquitto and its clients when missing (as root,
# with apt-get) and sets MOSQUITTO to the broker's path.
ensure_mosquitto() {
    local missing=()
    command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || missing+=(mosquitto)
    command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
    if ((${#missing[@]})); then
        apt_install "${missing[@]}" || return 1
    fi
    MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
}

# start_mosquitto DIR PORT: starts a broker on 127.0.0.1:PORT with its config
# and log in DIR, waits until it listens (30 s at most), and sets MQTT_PID.
start_mosquitto() {
    local dir="$1" port="$2" deadline
    mkdir -p "$dir"
    {
        echo "listener $port 127.0.0.1"
        echo "allow_anonymous true"
        echo "persistence false"
        echo "# Mosquitto's default drops a session's messages past 1000 queued,"
        echo "# silently; an edge that is slow or restarting must not lose them."
        echo "max_queued_messages 100000"
        echo "log_dest stdout"
    } >"$dir/mosquitto.conf"
    "$MOSQUITTO" -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 </dev/null &
    MQTT_PID=$!
    deadline=$((SECONDS + 30))
    until port_open "$port"; do
        if ! kill -0 "$MQTT_PID" 2>/dev/null || ((SECONDS >= deadline)); then
            cat "$dir/mosquitto.log" >&2
            echo "mosquitto did not listen on $port" >&2
            return 1
        fi
        sleep 0.1
    done
}

# ensure_chromium: installs Chromium and its WebDriver (as root, with
# apt-get) when either is missing, checks that their versions match, and
# exports TRIBUTARY_CHROMIUM and TRIBUTARY_CHROMEDRIVER for the dashboard's
# browser test. Debian's chromium-driver is built from the same source as
# its chromium, so one install keeps them in step.
ensure_chromium() {
    local missing=() browser driver browser_version driver_version
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    if ((${#missing[@]})); then
        # chromium too, even when present: chromium-driver depends on the
        # same version, and apt upgrades an older chromium with it.
        apt_install chromium chromium-driver || return 1
    fi
    browser="$(command -v chromium)" || { echo "chromium is not on PATH" >&2; return 1; }
    driver="$(command -v chromedriver)" || { echo "chromedriver is not on PATH" >&2; return 1; }
    # "Chromium 156.0.8078.79 built on Debian ..." and "ChromeDriver 156.0.8078.79 (...)".
    browser_version="$("$browser" --version 2>/dev/null | grep -oE '[0-9]+(\.[0-9]+){3}' | head -n 1)"
    driver_version="$("$driver" --version 2>/dev/null | grep -oE '[0-9]+(\.[0-9]+){3}' | head -n 1)"
    if [[ -z "$browser_version" || -z "$driver_version" ]]; then
        echo "could not read the versions of $browser ($browser_version) and $driver ($driver_version)" >&2
        return 1
    fi
    if [[ "${browser_version%%.*}" != "${driver_version%%.*}" ]]; then
        echo "chromium $browser_version and chromedriver $driver_version differ: upgrade both (apt-get install chromium chromium-driver)" >&2
        return 1
    fi
    echo "chromium $browser_version, chromedriver $driver_version"
    export TRIBUTARY_CHROMIUM="$browser" TRIBUTARY_CHROMEDRIVER="$driver"
}
