#!/usr/bin/env bash
# A throwaway MIT Kerberos realm for the gateway-auth-kerberos tests, in one directory.
#
#   plugins/auth-kerberos/ci/start-kdc.sh --install   # as root: only install Debian's packages
#   plugins/auth-kerberos/ci/start-kdc.sh DIR         # create the realm in DIR and start its KDC
#   plugins/auth-kerberos/ci/start-kdc.sh --stop DIR  # stop the KDC started in DIR
#
# Packages (krb5-kdc, krb5-admin-server, krb5-user, libkrb5-dev and gcc; the last two are what
# the `gssapi` and `pykerberos` Python packages build with) are installed when a command or the
# GSSAPI headers are missing and we are root, waiting for the dpkg lock; otherwise the script
# says what to install. The realm itself needs neither root nor systemd.
#
# In DIR it writes: krb5.conf and kdc.conf (rdns and hostname canonicalization off, the KDC on
# a free loopback port, TCP and UDP), the database, and
#   http.keytab     HTTP/localhost and HTTP/127.0.0.1 (what a gateway on loopback needs)
#   alice.keytab    the user alice (password: KRB_USER_PASSWORD, default "alice-password")
#   stale.keytab    HTTP/rotated.test at an old key version (its key was changed afterwards)
#   other.keytab    host/localhost only (a keytab with no HTTP principal)
# plus principals bob (password "bob-password"), HTTP/elsewhere.test (in no keytab), and
# env.sh with the variables that point a process at this realm:
#   KRB5_CONFIG, KRB5_KDC_PROFILE, KRB5CCNAME, KRB5_KTNAME, KRB5RCACHEDIR, KRB_REALM, KRB_KDC_PORT
# The KDC's pid is in DIR/krb5kdc.pid, its log in DIR/kdc.log. Exits non-zero, with the reason,
# when the KDC does not come up.
set -euo pipefail

REALM="${KRB_REALM:-GATEWAY.TEST}"
USER_PASSWORD="${KRB_USER_PASSWORD:-alice-password}"

log() { echo "start-kdc: $*" >&2; }

install_packages() {
    local need=()
    for pair in krb5kdc:krb5-kdc kadmin.local:krb5-admin-server kinit:krb5-user \
        krb5-config:libkrb5-dev cc:gcc; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
    done
    # The headers gssapi and pykerberos compile against.
    [ -e /usr/include/gssapi/gssapi.h ] || [ -e /usr/include/mit-krb5/gssapi/gssapi.h ] ||
        need+=(libkrb5-dev)
    [ "${#need[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        log "missing packages: ${need[*]}; install them as root: apt-get install -y ${need[*]}"
        exit 1
    fi
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt/dpkg run (up to 10 minutes) instead of failing on its lock.
    local apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
    "${apt[@]}" update
    # policy-rc.d: the packages' postinst must not try to start the system's KDC.
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    "${apt[@]}" install -y --no-install-recommends krb5-kdc krb5-admin-server krb5-user \
        libkrb5-dev gcc >/dev/null
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

# Running (a zombie, left to a parent that has not reaped it yet, counts as gone).
alive() { [ -r "/proc/$1/stat" ] && ! grep -qE '^[0-9]+ \(.*\) Z' "/proc/$1/stat" 2>/dev/null; }

stop_kdc() {
    local dir="$1"
    if [ -f "$dir/krb5kdc.pid" ]; then
        local pid
        pid="$(cat "$dir/krb5kdc.pid")"
        kill "$pid" 2>/dev/null || true
        # Gone (its port free again) before we return, so a restart can bind it.
        for _ in $(seq 100); do
            alive "$pid" || break
            sleep 0.05
        done
        rm -f "$dir/krb5kdc.pid"
    fi
}

case "${1:-}" in
--install)
    install_packages
    exit 0
    ;;
--stop)
    stop_kdc "${2:?usage: start-kdc.sh --stop DIR}"
    exit 0
    ;;
"" | -*)
    sed -n '2,23p' "$0" >&2
    exit 2
    ;;
esac

install_packages
mkdir -p "$1"
DIR="$(cd "$1" && pwd)"
stop_kdc "$DIR"

# A port free for both TCP and UDP on loopback (the KDC serves both), unless KRB_KDC_PORT names
# one (the test fixture picks it, saving a Python start-up here).
PORT="${KRB_KDC_PORT:-}"
if [ -z "$PORT" ]; then
    PORT="$(python3 - <<'PY'
import socket
for _ in range(50):
    with socket.socket() as t:
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
    print(port)
    break
PY
)"
fi

cat >"$DIR/krb5.conf" <<CONF
[libdefaults]
    default_realm = $REALM
    dns_lookup_realm = false
    dns_lookup_kdc = false
    rdns = false
    dns_canonicalize_hostname = false
    # A ticket a few seconds past its end is expired at once (the default allows 5 minutes).
    clockskew = 2
    udp_preference_limit = 1
    default_ccache_name = FILE:$DIR/ccache
    default_keytab_name = FILE:$DIR/http.keytab
    # No default_client_keytab_name: with one, MIT silently renews an expired ticket from it.

[realms]
    $REALM = {
        kdc = 127.0.0.1:$PORT
    }

[domain_realm]
    localhost = $REALM
    127.0.0.1 = $REALM
    .test = $REALM
CONF

cat >"$DIR/kdc.conf" <<CONF
[kdcdefaults]
    kdc_listen = 127.0.0.1:$PORT
    kdc_tcp_listen = 127.0.0.1:$PORT

[realms]
    $REALM = {
        database_name = $DIR/principal
        key_stash_file = $DIR/stash
        acl_file = $DIR/kadm5.acl
        max_life = 10h
        max_renewable_life = 1d
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }

[logging]
    kdc = FILE:$DIR/kdc.log
    admin_server = FILE:$DIR/kadmin.log
    default = FILE:$DIR/krb5lib.log
CONF
: >"$DIR/kadm5.acl"

export KRB5_CONFIG="$DIR/krb5.conf" KRB5_KDC_PROFILE="$DIR/kdc.conf"

if [ ! -e "$DIR/principal" ]; then
    kdb5_util -r "$REALM" create -s -P "master-$RANDOM$RANDOM" >/dev/null
    kadmin.local -r "$REALM" >"$DIR/kadmin.out" 2>&1 <<ADMIN
addprinc -pw $USER_PASSWORD alice
addprinc -pw bob-password bob
addprinc -randkey HTTP/localhost
addprinc -randkey HTTP/127.0.0.1
addprinc -randkey HTTP/elsewhere.test
addprinc -randkey HTTP/rotated.test
addprinc -randkey host/localhost
ktadd -k $DIR/http.keytab HTTP/localhost HTTP/127.0.0.1
ktadd -k $DIR/other.keytab host/localhost
ktadd -k $DIR/stale.keytab HTTP/rotated.test
ktadd -k $DIR/rotated-new.keytab HTTP/rotated.test
ktadd -norandkey -k $DIR/alice.keytab alice
ADMIN
fi

rm -f "$DIR/krb5kdc.pid"
# Its output goes to a file: a caller reading our stdout must not wait for the KDC to exit.
krb5kdc -n -r "$REALM" </dev/null >>"$DIR/kdc.out" 2>&1 &
KDC_PID=$!
echo "$KDC_PID" >"$DIR/krb5kdc.pid"

cat >"$DIR/env.sh" <<ENV
export KRB5_CONFIG=$DIR/krb5.conf
export KRB5_KDC_PROFILE=$DIR/kdc.conf
export KRB5CCNAME=FILE:$DIR/ccache
export KRB5_KTNAME=FILE:$DIR/http.keytab
export KRB5RCACHEDIR=$DIR
export KRB_REALM=$REALM
export KRB_KDC_PORT=$PORT
ENV

# Up when it answers on TCP (a kinit needs it up anyway).
for _ in $(seq 100); do
    if ! kill -0 "$KDC_PID" 2>/dev/null; then
        log "krb5kdc exited at once; its log:"
        tail -n 20 "$DIR/kdc.out" "$DIR/kdc.log" >&2 || true
        exit 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        echo "$DIR/env.sh"
        exit 0
    fi
    sleep 0.05
done
log "krb5kdc did not listen on 127.0.0.1:$PORT within 5 s; its log:"
tail -n 20 "$DIR/kdc.log" >&2 || true
stop_kdc "$DIR"
exit 1
