#!/usr/bin/env bash
# The local service stack: Kafka, Redis, OpenSearch and Prometheus as plain processes on
# 127.0.0.1. There is no Docker here or in CI, so everything comes from what the machine
# can reach: Maven Central (Kafka, OpenSearch) and Debian (redis-server, prometheus).
#
#   stack/stack.sh up | down | status            the whole stack
#   stack/stack.sh start|stop|restart SVC...     one service (kafka kafka-sasl redis redis-tls
#                                                opensearch opensearch-secure prometheus)
#   stack/stack.sh start-opensearch | stop-opensearch   (and the same for every service)
#   stack/stack.sh reload-prometheus             re-read ops/prometheus/*.rules.yml
#   stack/stack.sh logs SVC [N]                  last N lines of a service's log
#   stack/stack.sh kafka-class MAIN.Class ARGS   run a Kafka CLI class (e.g. TopicCommand)
#   stack/stack.sh secured                       the secured side's CA, users and password files
#
# Layout, environment variables and gotchas: stack/README.md.
set -euo pipefail

STACK_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$STACK_SRC/.." && pwd)

STACK_DIR=${STACK_DIR:-$REPO_DIR/.stack}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
# The secured Kafka: a second KRaft node, SASL_SSL with SCRAM-SHA-512 users and ACLs only
# (its controller listener takes only the broker's own TLS client certificate).
KAFKA_SASL_PORT=${KAFKA_SASL_PORT:-9094}
KAFKA_SASL_CONTROLLER_PORT=${KAFKA_SASL_CONTROLLER_PORT:-9095}
REDIS_PORT=${REDIS_PORT:-6379}
# The secured Redis: TLS only, ACL users with passwords, the default user off (a second
# redis-server, since ACL users apply to every port of a server; stack/README.md).
REDIS_TLS_PORT=${REDIS_TLS_PORT:-6380}
OPENSEARCH_PORT=${OPENSEARCH_PORT:-9200}
# The secured OpenSearch: a second node with the security plugin (TLS on HTTP and transport,
# users and roles). Its transport port is fixed and outside the 9300-9400 range the open
# node takes its first free port from, so the two never race for one.
OPENSEARCH_SECURE_PORT=${OPENSEARCH_SECURE_PORT:-9201}
OPENSEARCH_SECURE_TRANSPORT_PORT=${OPENSEARCH_SECURE_TRANSPORT_PORT:-9401}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
METRICS_PORTS=${METRICS_PORTS:-3030,3031}

# Pinned so that every machine runs the same bits; newest patch releases on Maven Central
# when this was written. Override to try another release (the download is cached per version).
KAFKA_VERSION=${KAFKA_VERSION:-3.9.2}
OPENSEARCH_VERSION=${OPENSEARCH_VERSION:-2.19.6}
OPENSEARCH_USER=${OPENSEARCH_USER:-opensearch}
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}
OPENSEARCH_HEAP=${OPENSEARCH_HEAP:-512m}
# The security plugin is on Maven Central for 2.19.3.0 and 2.19.4.0 only (2.19.5.0 and
# 2.19.6.0: HTTP 404), and a plugin installs only into the OpenSearch it was built for: the
# secured node runs the newest of those, not OPENSEARCH_VERSION.
OPENSEARCH_SECURE_VERSION=${OPENSEARCH_SECURE_VERSION:-2.19.4}
OPENSEARCH_SECURITY_VERSION=${OPENSEARCH_SECURITY_VERSION:-$OPENSEARCH_SECURE_VERSION.0}
OPENSEARCH_SECURE_HEAP=${OPENSEARCH_SECURE_HEAP:-384m}
# Seconds to wait for a graceful stop before SIGKILL (Kafka's controlled shutdown is the slow one).
STOP_TIMEOUT=${STOP_TIMEOUT:-30}

SERVICES=(kafka kafka-sasl redis redis-tls opensearch opensearch-secure prometheus)

# Seconds since the command started, so a slow CI run shows where the time went.
log() { printf '[stack %3ss] %s\n' "$SECONDS" "$*"; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

# --------------------------------------------------------------------------- layout

# OpenSearch runs as another user and gets these paths in config files: make them absolute.
mkdir -p "$STACK_DIR"
STACK_DIR=$(cd "$STACK_DIR" && pwd)
DIST=$STACK_DIR/dist
CONF=$STACK_DIR/conf
DATA=$STACK_DIR/data
LOGS=$STACK_DIR/logs
RUN=$STACK_DIR/run
TMP=$STACK_DIR/tmp

KAFKA_JARS=$DIST/kafka-$KAFKA_VERSION/jars
KAFKA_PROPS=$CONF/kafka/server.properties
# The secured side: a CA the stack generates, the server certificates it signs, and the
# service accounts' passwords (generated once, kept across restarts; mode 600).
TLS=$STACK_DIR/tls
SECRETS=$STACK_DIR/secrets
KAFKA_SASL_PROPS=$CONF/kafka-sasl/server.properties
REDIS_TLS_CONF=$CONF/redis-tls/redis.conf
REDIS_TLS_USERS=$CONF/redis-tls/users.acl
OS_HOME=$DIST/opensearch-$OPENSEARCH_VERSION
OS_CONF=$CONF/opensearch
OS_PIDFILE=$RUN/opensearch/opensearch.pid  # written by OpenSearch itself, hence its own dir
OSS_HOME=$DIST/opensearch-secure-$OPENSEARCH_SECURE_VERSION  # with the security plugin
OSS_CONF=$CONF/opensearch-secure
OSS_PIDFILE=$RUN/opensearch-secure/opensearch.pid
PROM_CONF=$CONF/prometheus/prometheus.yml

log_file() { echo "$LOGS/$1.log"; }

pid_file() {
  case $1 in
    opensearch) echo "$OS_PIDFILE" ;;
    opensearch-secure) echo "$OSS_PIDFILE" ;;
    *) echo "$RUN/$1.pid" ;;
  esac
}

port_of() {
  case $1 in
    kafka) echo "$KAFKA_PORT" ;;
    kafka-sasl) echo "$KAFKA_SASL_PORT" ;;
    redis) echo "$REDIS_PORT" ;;
    redis-tls) echo "$REDIS_TLS_PORT" ;;
    opensearch) echo "$OPENSEARCH_PORT" ;;
    opensearch-secure) echo "$OPENSEARCH_SECURE_PORT" ;;
    prometheus) echo "$PROMETHEUS_PORT" ;;
  esac
}

port_var_of() {
  case $1 in
    kafka) echo KAFKA_PORT ;;
    kafka-sasl) echo KAFKA_SASL_PORT ;;
    redis) echo REDIS_PORT ;;
    redis-tls) echo REDIS_TLS_PORT ;;
    opensearch) echo OPENSEARCH_PORT ;;
    opensearch-secure) echo OPENSEARCH_SECURE_PORT ;;
    prometheus) echo PROMETHEUS_PORT ;;
  esac
}

# A string that only our instance has on its command line (arguments joined by spaces), so
# a recycled pid, the same service from another STACK_DIR, or one of OpenSearch's helper
# JVMs (they get the same -Dopensearch.path.conf) is never mistaken for ours. Redis
# rewrites its process title to "redis-server 127.0.0.1:PORT", so that title is the marker.
marker_of() {
  case $1 in
    kafka) echo "$KAFKA_PROPS" ;;
    kafka-sasl) echo "$KAFKA_SASL_PROPS" ;;
    redis) echo "redis-server 127.0.0.1:$REDIS_PORT" ;;
    redis-tls) echo "redis-server 127.0.0.1:$REDIS_TLS_PORT" ;;
    opensearch) echo "org.opensearch.bootstrap.OpenSearch -p $OS_PIDFILE" ;;
    opensearch-secure) echo "org.opensearch.bootstrap.OpenSearch -p $OSS_PIDFILE" ;;
    prometheus) echo "--config.file=$PROM_CONF" ;;
  esac
}

start_timeout_of() {
  if [[ -n ${STACK_START_TIMEOUT:-} ]]; then echo "$STACK_START_TIMEOUT"; return; fi
  case $1 in
    kafka | kafka-sasl) echo 90 ;;
    redis | redis-tls) echo 20 ;;
    opensearch | opensearch-secure) echo 180 ;;
    prometheus) echo 60 ;;
  esac
}

is_service() {
  local s
  for s in "${SERVICES[@]}"; do [[ $s == "$1" ]] && return 0; done
  return 1
}

# --------------------------------------------------------------------------- processes

# kill -0 also succeeds for a zombie, which would make a stop wait for the full timeout.
pid_alive() {
  local state
  [[ -r /proc/$1/stat ]] || return 1
  state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ $state != Z && $state != X ]]
}

# The executable name as well as the marker: the grep in svc_pid, or a shell that merely
# mentions the path, must not pass for the service.
comm_of() {
  case $1 in
    kafka | kafka-sasl | opensearch | opensearch-secure) echo java ;;
    redis | redis-tls) echo redis-server ;;
    prometheus) echo prometheus ;;
  esac
}

is_our_process() {
  local cmdline comm
  pid_alive "$1" || return 1
  comm=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
  [[ $comm == "$(comm_of "$2")" ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$(marker_of "$2")"* ]]
}

# Prints the pid of our running instance of a service; fails when it is not running.
# The pid file is the fast path; without one (OpenSearch writes its own only once the JVM
# is up, or someone deleted run/) the process is found by its marker.
svc_pid() {
  local pidfile pid path
  pidfile=$(pid_file "$1")
  if [[ -s $pidfile ]]; then
    pid=$(tr -dc '0-9' <"$pidfile")
    if [[ -n $pid ]] && is_our_process "$pid" "$1"; then
      echo "$pid"
      return 0
    fi
  fi
  # /proc/*/cmdline separates arguments with NULs, so grep for the marker's last word only
  # and let is_our_process compare the whole marker.
  while read -r path; do
    pid=${path#/proc/}
    pid=${pid%/cmdline}
    if [[ $pid != "$$" && $pid != "$BASHPID" ]] && is_our_process "$pid" "$1"; then
      echo "$pid"
      return 0
    fi
  done < <(marker=$(marker_of "$1") && grep -alsF -- "${marker##* }" /proc/[0-9]*/cmdline)
  return 1
}

# "who has this TCP port", for the message that refuses to start a service on a taken
# port instead of timing out with a confusing "address already in use" in a log.
port_listener() {
  local who
  who=$(ss -Hltnp "sport = :$1" 2>/dev/null | sed -nE 's/.*users:\(\("([^"]*)",pid=([0-9]+).*/\1 (pid \2)/p' | head -n1)
  echo "${who:-another process}"
}

port_busy() {
  [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]
}

fail_with_log() {
  local svc=$1 msg=$2 logf
  logf=$(log_file "$svc")
  {
    printf '[stack] ERROR: %s: %s\n' "$svc" "$msg"
    if [[ -s $logf ]]; then
      printf '[stack] last 30 lines of %s:\n' "$logf"
      tail -n 30 "$logf" | sed 's/^/    /'
    else
      printf '[stack] (log %s is empty or missing)\n' "$logf"
    fi
  } >&2
  exit 1
}

# Appended rather than truncated, so a crash followed by a restart keeps the crash's story;
# the banner marks where each run starts.
log_banner() {
  mkdir -p "$LOGS"
  printf '\n===== stack.sh: starting %s at %s =====\n' "$1" "$(date -Is)" >>"$(log_file "$1")"
}

# --------------------------------------------------------------------------- health checks

healthy() {
  local port
  port=$(port_of "$1")
  case $1 in
    kafka) python3 "$STACK_SRC/kafka_probe.py" 127.0.0.1 "$port" 1 2>/dev/null ;;
    # The same Metadata request, over TLS after a SCRAM login as stack-admin.
    kafka-sasl)
      python3 "$STACK_SRC/kafka_probe.py" 127.0.0.1 "$port" 1 \
        --sasl-ssl "$TLS/ca.pem" stack-admin "$SECRETS/kafka-admin.password" 2>/dev/null ;;
    redis) [[ $(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null) == PONG ]] ;;
    # As the admin account, over TLS with the stack's CA: the password goes through the
    # environment, never on a command line.
    redis-tls)
      [[ $(REDISCLI_AUTH=$(cat "$SECRETS/redis-admin.password") redis-cli --tls \
        --cacert "$TLS/ca.pem" -h 127.0.0.1 -p "$port" --user stack-admin ping 2>/dev/null) == PONG ]] ;;
    opensearch)
      curl -fsS --max-time 3 "http://127.0.0.1:$port/_cluster/health" 2>/dev/null |
        grep -Eq '"status":"(green|yellow)"' ;;
    # Over TLS with the admin certificate; the security plugin says DOWN until it has loaded
    # its users and roles.
    opensearch-secure)
      os_curl opensearch-secure /_plugins/_security/health --max-time 3 2>/dev/null |
        grep -q '"status":"UP"' &&
        os_curl opensearch-secure /_cluster/health --max-time 3 2>/dev/null |
        grep -Eq '"status":"(green|yellow)"' ;;
    prometheus) curl -fsS --max-time 3 -o /dev/null "http://127.0.0.1:$port/-/ready" 2>/dev/null ;;
  esac
}

wait_healthy() {
  local svc=$1 timeout deadline
  timeout=$(start_timeout_of "$svc")
  deadline=$((SECONDS + timeout))
  until healthy "$svc"; do
    # A process that already died will not become healthy: say so now, not at the deadline.
    svc_pid "$svc" >/dev/null || fail_with_log "$svc" "the process exited during startup"
    ((SECONDS < deadline)) || fail_with_log "$svc" "not healthy after ${timeout}s on port $(port_of "$svc")"
    sleep 0.5
  done
}

# --------------------------------------------------------------------------- installs

java_home() {
  if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then echo "$JAVA_HOME"; return; fi
  local java
  java=$(command -v java) || die "java not found (Java 17 is needed for Kafka and OpenSearch)"
  java=$(readlink -f "$java")
  echo "${java%/bin/java}"
}

# Debian packages are installed only when their binary is missing. On a fresh machine the
# package lists may be empty, so an install that fails is retried once after apt-get update.
apt_install() {
  local pkgs=("$@") created_policy=0 rc=0
  ((${#pkgs[@]})) || return 0
  [[ $(id -u) == 0 ]] || die "missing ${pkgs[*]}: run 'sudo apt-get install -y ${pkgs[*]}' or run this as root"
  # Without systemd, the packages' postinst would start their own redis/prometheus on the
  # default ports (and as other users). policy-rc.d exit 101 tells invoke-rc.d not to; we
  # only add it when the machine has none, and remove it again.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# temporary, from stack/stack.sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  local apt_log=$LOGS/install.log
  mkdir -p "$LOGS"
  log "apt: installing ${pkgs[*]} (output in $apt_log)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$apt_log" 2>&1; then
    log "apt: not installable with the current package lists; running apt-get update"
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >>"$apt_log" 2>&1 || rc=$?
  fi
  if ((created_policy)); then rm -f /usr/sbin/policy-rc.d; fi
  if ((rc)); then
    tail -n 30 "$apt_log" >&2
    die "apt-get install ${pkgs[*]} failed (exit $rc); full output in $apt_log"
  fi
}

# mvn only on a cold cache: the result is kept under dist/, named by version.
mvn_fetch() {
  local profile=$1 out=$2
  shift 2
  local mvn_log=$LOGS/install.log
  command -v mvn >/dev/null || die "mvn not found (needed once, to fetch $profile from Maven Central)"
  mkdir -p "$LOGS"
  local args=(-B -q -f "$STACK_SRC/pom.xml" -P "$profile"
    -Dkafka.version="$KAFKA_VERSION" -Dopensearch.version="$OPENSEARCH_VERSION"
    -Dopensearch.secure.version="$OPENSEARCH_SECURE_VERSION"
    -Dopensearch.security.version="$OPENSEARCH_SECURITY_VERSION"
    -Dstack.build.dir="$TMP/mvn"
    dependency:copy-dependencies -DoutputDirectory="$out" "$@")
  # Offline first: with a warm ~/.m2 (a new STACK_DIR, a CI cache) that skips Maven's
  # remote metadata checks. Output goes to the install log: even with -q, Maven 3.8
  # prints stray terminal escapes.
  mvn -o "${args[@]}" >>"$mvn_log" 2>&1 && return 0
  if ! mvn "${args[@]}" >>"$mvn_log" 2>&1; then
    tail -n 30 "$mvn_log" >&2
    die "mvn could not fetch the $profile artifacts; full output in $mvn_log"
  fi
}

install_kafka() {
  [[ -f $KAFKA_JARS/.complete ]] && return 0
  log "kafka: fetching kafka_2.13:$KAFKA_VERSION and its runtime jars from Maven Central"
  local staging=$KAFKA_JARS.partial
  rm -rf "$staging"
  mvn_fetch kafka "$staging" -DincludeScope=runtime
  ls "$staging"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null || die "kafka: kafka_2.13-$KAFKA_VERSION.jar was not fetched"
  touch "$staging/.complete"
  rm -rf "$KAFKA_JARS" && mv "$staging" "$KAFKA_JARS"
}

# OpenSearch VERSION unzipped from the integ-test zip in ARTIFACTS into STAGING, plus the
# mapper-extras module.
unpack_opensearch() {
  local version=$1 artifacts=$2 staging=$3
  rm -rf "$staging" "$staging.unzip"
  unzip -q "$artifacts/opensearch-$version.zip" -d "$staging.unzip"
  mv "$staging.unzip/opensearch-$version" "$staging" && rmdir "$staging.unzip"
  # rank_feature lives in the mapper-extras module, which the integ-test zip leaves out.
  # Maven Central has its classes as mapper-extras-client; a module is that jar plus a
  # descriptor (fields as in OpenSearch's PluginInfo).
  mkdir -p "$staging/modules/mapper-extras"
  cp "$artifacts/mapper-extras-client-$version.jar" "$staging/modules/mapper-extras/"
  cat >"$staging/modules/mapper-extras/plugin-descriptor.properties" <<EOF
description=Adds advanced field mappers (rank_feature, rank_features, scaled_float, ...)
version=$version
name=mapper-extras
classname=org.opensearch.index.mapper.MapperExtrasPlugin
java.version=11
opensearch.version=$version
extended.plugins=
has.native.controller=false
EOF
}

install_opensearch() {
  [[ -f $OS_HOME/.complete ]] && return 0
  local artifacts=$DIST/opensearch-$OPENSEARCH_VERSION-artifacts staging=$OS_HOME.partial
  if [[ ! -f $artifacts/.complete ]]; then
    log "opensearch: fetching integ-test-zip:$OPENSEARCH_VERSION and mapper-extras from Maven Central"
    rm -rf "$artifacts"
    mvn_fetch opensearch "$artifacts" -DexcludeTransitive=true
    touch "$artifacts/.complete"
  fi
  unpack_opensearch "$OPENSEARCH_VERSION" "$artifacts" "$staging"
  touch "$staging/.complete"
  rm -rf "$OS_HOME" && mv "$staging" "$OS_HOME"
}

# The secured node's own distribution (never the open node's: a node with the plugin
# installed does not start without its TLS configuration), with the security plugin
# installed by bin/opensearch-plugin from the zip Maven fetched.
install_opensearch-secure() {
  [[ -f $OSS_HOME/.complete ]] && return 0
  local artifacts=$DIST/opensearch-secure-$OPENSEARCH_SECURE_VERSION-artifacts staging=$OSS_HOME.partial
  local plugin_zip=opensearch-security-$OPENSEARCH_SECURITY_VERSION.zip
  if [[ ! -f $artifacts/.complete ]]; then
    log "opensearch-secure: fetching integ-test-zip and mapper-extras $OPENSEARCH_SECURE_VERSION and opensearch-security $OPENSEARCH_SECURITY_VERSION from Maven Central"
    rm -rf "$artifacts"
    mvn_fetch opensearch-secure "$artifacts" -DexcludeTransitive=true
    [[ -s $artifacts/$plugin_zip ]] || die "opensearch-secure: $plugin_zip was not fetched"
    touch "$artifacts/.complete"
  fi
  unpack_opensearch "$OPENSEARCH_SECURE_VERSION" "$artifacts" "$staging"
  # --batch grants the permissions the plugin asks for. It refuses an OpenSearch of
  # another version than its own, which is why this node runs OPENSEARCH_SECURE_VERSION.
  log "opensearch-secure: installing the security plugin (bin/opensearch-plugin install)"
  env -i PATH=/usr/local/bin:/usr/bin:/bin OPENSEARCH_JAVA_HOME="$(java_home)" \
    "$staging/bin/opensearch-plugin" install --batch "file://$artifacts/$plugin_zip" \
    >>"$LOGS/install.log" 2>&1 || {
    tail -n 30 "$LOGS/install.log" >&2
    die "opensearch-secure: bin/opensearch-plugin could not install $plugin_zip; full output in $LOGS/install.log"
  }
  touch "$staging/.complete"
  rm -rf "$OSS_HOME" && mv "$staging" "$OSS_HOME"
}

# Debian packages the named services need and this machine lacks, as one list so that
# they go into one apt transaction (and at most one apt-get update).
missing_packages() {
  local svc
  for svc in "$@"; do
    case $svc in
      redis | redis-tls) command -v redis-server >/dev/null && command -v redis-cli >/dev/null || echo redis-server ;;
      prometheus) command -v prometheus >/dev/null && command -v promtool >/dev/null || echo prometheus ;;
      opensearch) [[ -f $OS_HOME/.complete ]] || command -v unzip >/dev/null || echo unzip ;;
      opensearch-secure) [[ -f $OSS_HOME/.complete ]] || command -v unzip >/dev/null || echo unzip ;;
    esac
  done
  # Slim images lack even these.
  command -v ss >/dev/null || echo iproute2
  command -v pgrep >/dev/null || echo procps
  command -v curl >/dev/null || echo curl
  command -v openssl >/dev/null || echo openssl
}

install_services() {
  local svc apt_pid="" pkgs home
  mapfile -t pkgs < <(missing_packages "$@")
  # apt and Maven both spend their time downloading: run them side by side.
  if ((${#pkgs[@]})); then
    apt_install "${pkgs[@]}" &
    apt_pid=$!
  fi
  for svc in "$@"; do
    case $svc in
      kafka | kafka-sasl) install_kafka ;;
      opensearch | opensearch-secure)
        # unzip may be one of the packages still being installed.
        home=$OS_HOME
        [[ $svc == opensearch ]] || home=$OSS_HOME
        if [[ -n $apt_pid && ! -f $home/.complete ]] && ! command -v unzip >/dev/null; then
          wait "$apt_pid" || die "apt-get failed (see $LOGS/install.log)"
          apt_pid=""
        fi
        "install_$svc"
        ;;
    esac
  done
  if [[ -n $apt_pid ]]; then
    wait "$apt_pid" || die "apt-get failed (see $LOGS/install.log)"
  fi
}

# --------------------------------------------------------------------------- configs

configure_kafka() {
  mkdir -p "$CONF/kafka" "$DATA/kafka"
  cp "$STACK_SRC/kafka-log4j.properties" "$CONF/kafka/log4j.properties"
  cat >"$KAFKA_PROPS" <<EOF
# Generated by stack/stack.sh on every start; edit the script, not this file.
# One KRaft node that is both broker and controller, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$DATA/kafka

num.partitions=1
auto.create.topics.enable=true
delete.topic.enable=true
# A single broker cannot hold more than one replica of anything.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions than the default 50: the first consumer group on a fresh
# broker waits for __consumer_offsets to be created, and small is faster on 2 cores.
offsets.topic.num.partitions=10
transaction.state.log.num.partitions=10
# Tests join and leave groups constantly; the 3 s default delay would slow every one.
group.initial.rebalance.delay.ms=0
# Replay and recovery tests read old offsets: keep a month rather than a week.
log.retention.hours=720
EOF
}

# Kafka cluster ids are 16 random bytes in URL-safe base64 without padding. One in 64 of
# those starts with "-", which the formatting tool's argument parser takes for an option
# ("argument --cluster-id: expected one argument"); Kafka's own Uuid.randomUuid() skips
# them for the same reason, and so does this. (An optional count prints that many ids.)
new_kafka_cluster_id() {
  python3 -c '
import base64, sys, uuid
wanted = int(sys.argv[1])
while wanted:
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    if not cluster_id.startswith("-"):
        print(cluster_id)
        wanted -= 1
' "${1:-1}"
}

# Formatting writes meta.properties; doing it again would fail (or, forced, lose data).
format_kafka_storage() {
  [[ -f $DATA/kafka/meta.properties ]] && return 0
  local cluster_id
  cluster_id=$(new_kafka_cluster_id)
  log "kafka: formatting storage in $DATA/kafka (cluster id $cluster_id)"
  java -Dlog4j.configuration="file:$CONF/kafka/log4j.properties" -cp "$KAFKA_JARS/*" \
    kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" \
    >>"$(log_file kafka)" 2>&1 || fail_with_log kafka "storage format failed"
}

configure_redis() {
  mkdir -p "$DATA/redis"
}

# --------------------------------------------------------------------------- the secured side

# The stack's CA and one server certificate for every secured listener (SAN localhost and
# 127.0.0.1), made once with openssl (see ensure_signed_cert for when they are made again).
ensure_tls() {
  mkdir -p "$TLS" "$LOGS"
  chmod 755 "$TLS"
  if [[ ! -s $TLS/ca.pem || ! -s $TLS/ca.key ]]; then
    log "tls: generating the stack's CA in $TLS"
    rm -f "$TLS"/*
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
      -keyout "$TLS/ca.key" -out "$TLS/ca.pem" -subj "/CN=search-features local stack CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      >>"$LOGS/install.log" 2>&1 || die "tls: openssl could not make the CA (see $LOGS/install.log)"
    chmod 600 "$TLS/ca.key"
  fi
  # clientAuth too: the secured Kafka node presents it to its own controller listener.
  ensure_signed_cert server /CN=localhost "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    "extendedKeyUsage=serverAuth,clientAuth"
}

# tls/NAME.pem, a certificate for SUBJECT that the stack's CA signs, with the extensions
# given (lines of an openssl extension file) and the usual ones of a leaf certificate, and
# its key tls/NAME.key (PKCS#8, unencrypted, mode 600). Made again when missing, expiring
# within a day, not signed by the current CA, or made with other extensions
# (tls/NAME.ext keeps those it was made with).
ensure_signed_cert() {
  local name=$1 subject=$2 ext
  shift 2
  ext=$(printf '%s\n' "$@" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "subjectKeyIdentifier=hash" \
    "authorityKeyIdentifier=keyid")
  if [[ -s $TLS/$name.pem && -s $TLS/$name.key && $(cat "$TLS/$name.ext" 2>/dev/null) == "$ext" ]] &&
    openssl x509 -in "$TLS/$name.pem" -noout -checkend 86400 >/dev/null 2>&1 &&
    openssl verify -CAfile "$TLS/ca.pem" "$TLS/$name.pem" >/dev/null 2>&1; then
    return 0
  fi
  log "tls: signing a certificate for $subject ($TLS/$name.pem)"
  printf '%s\n' "$ext" >"$TLS/$name.ext"
  {
    openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$TLS/$name.key" -out "$TLS/$name.csr" \
      -subj "$subject" &&
      openssl x509 -req -sha256 -days 825 -in "$TLS/$name.csr" -CA "$TLS/ca.pem" \
        -CAkey "$TLS/ca.key" -CAcreateserial -out "$TLS/$name.pem" -extfile "$TLS/$name.ext"
  } >>"$LOGS/install.log" 2>&1 || die "tls: openssl could not sign $TLS/$name.pem (see $LOGS/install.log)"
  chmod 600 "$TLS/$name.key"
  rm -f "$TLS/$name.csr"
}

# A service account's password: random, made once, readable by root (or the stack's owner)
# only. Tests and `stack.sh secured` read it from the file.
ensure_password() {
  local file=$SECRETS/$1.password
  mkdir -p "$SECRETS"
  chmod 700 "$SECRETS"
  [[ -s $file ]] && return 0
  (umask 077 && openssl rand -hex 24 | tr -d '\n' >"$file.tmp") && mv "$file.tmp" "$file" ||
    die "could not write $file"
}

password_sha256() {
  tr -d '\n' <"$SECRETS/$1.password" | sha256sum | cut -d' ' -f1
}

# Redis users of the secured side (an ACL file), each with only what it needs
# (docs/operations.md, "Security"); the file holds their passwords' SHA-256, not the
# passwords.
#   search-features  the pipeline: PING, the sink's HSET/EXPIRE/DEL, HMGET of its store
#                    marker and the replay tool's SCAN, on keys feat* (feat, feat_v2, ...:
#                    the FEATURE_PREFIX versions)
#   ranking          the reader: HGETALL and PING, read-only on feat*
#   stack-admin      everything: the health check, tests, a developer's redis-cli
write_redis_tls_users() {
  local user
  for user in redis-pipeline redis-reader redis-admin; do ensure_password "$user"; done
  (
    umask 077
    cat >"$1" <<EOF
user default off resetkeys resetchannels -@all
user search-features on #$(password_sha256 redis-pipeline) resetchannels ~feat* -@all +ping +hset +hmget +expire +del +scan
user ranking on #$(password_sha256 redis-reader) resetchannels %R~feat* -@all +ping +hgetall
user stack-admin on #$(password_sha256 redis-admin) ~* &* +@all
EOF
  )
}

configure_redis-tls() {
  ensure_tls
  mkdir -p "$CONF/redis-tls" "$DATA/redis-tls"
  write_redis_tls_users "$REDIS_TLS_USERS"
  (
    umask 077
    cat >"$REDIS_TLS_CONF" <<EOF
# Generated by stack/stack.sh on every start; edit the script, not this file.
bind 127.0.0.1
protected-mode yes
port 0
tls-port $REDIS_TLS_PORT
tls-cert-file $TLS/server.pem
tls-key-file $TLS/server.key
tls-ca-cert-file $TLS/ca.pem
tls-auth-clients no
daemonize yes
pidfile $(pid_file redis-tls)
logfile $(log_file redis-tls)
dir $DATA/redis-tls
save ""
appendonly no
aclfile $REDIS_TLS_USERS
EOF
  )
}

# `up` on a running redis-tls: when the users changed (another checkout of this script),
# load them into the running server.
refresh_redis-tls() {
  local fresh=$TMP/redis-tls-users.acl.new out
  mkdir -p "$TMP"
  write_redis_tls_users "$fresh"
  if cmp -s "$fresh" "$REDIS_TLS_USERS"; then
    rm -f "$fresh"
    return 0
  fi
  mv "$fresh" "$REDIS_TLS_USERS"
  out=$(REDISCLI_AUTH=$(cat "$SECRETS/redis-admin.password") redis-cli --tls --cacert "$TLS/ca.pem" \
    -h 127.0.0.1 -p "$REDIS_TLS_PORT" --user stack-admin ACL LOAD 2>&1)
  [[ $out == OK ]] || die "redis-tls: could not load the changed users: $out"
  log "redis-tls: users changed, loaded them (ACL LOAD)"
}

# The secured Kafka's SCRAM-SHA-512 users, created when its storage is formatted (KRaft keeps
# them in the metadata log; `--add-scram`), and kept across restarts with their passwords:
#   kafka-broker     the node itself (inter-broker login; a super user)
#   search-features  the pipeline: ACLs below, nothing else
#   stack-admin      a super user: the health check, the ACLs, tests' topics and messages
KAFKA_SASL_USERS=(kafka-broker:kafka-broker search-features:kafka-pipeline stack-admin:kafka-admin)

# The pipeline's rights (kafka_sasl_acls), one AclCommand each: read its input topics
# (search-events*), write and create its dead-letter topics (search-events-dlq*), create,
# check, write and read its state topics (search-features-state*: the feature shards'
# recovery segments), and find the coordinator of the group ids its consumers carry (they
# join no group: offsets live in the recovery snapshots).
KAFKA_SASL_ACLS=(
  "--operation Read --operation Describe --resource-pattern-type prefixed --topic search-events"
  "--operation Write --operation Create --operation Describe --resource-pattern-type prefixed --topic search-events-dlq"
  "--operation Read --operation Write --operation Create --operation Describe --operation DescribeConfigs --resource-pattern-type prefixed --topic search-features-state"
  "--operation Describe --resource-pattern-type literal --group BYTEWAX_IGNORED"
  "--operation Describe --resource-pattern-type literal --group search-features-segments"
)

kafka_sasl_users_digest() {
  local pair
  for pair in "${KAFKA_SASL_USERS[@]}"; do
    printf '%s:%s\n' "${pair%%:*}" "$(password_sha256 "${pair#*:}")"
  done | sha256sum | cut -d' ' -f1
}

# The node's keystore (the server certificate and key) and truststore (the stack's CA), as
# PKCS12 for the JVM: made with openssl and keytool from tls/, again whenever the
# certificate is newer; their password is generated like the users'.
ensure_kafka_keystores() {
  ensure_password kafka-keystore
  if [[ -s $TLS/kafka.p12 && -s $TLS/kafka-truststore.p12 && $TLS/kafka.p12 -nt $TLS/server.pem ]]; then
    return 0
  fi
  log "kafka-sasl: building its keystore and truststore (openssl, keytool)"
  rm -f "$TLS/kafka.p12" "$TLS/kafka-truststore.p12"
  {
    openssl pkcs12 -export -name kafka -in "$TLS/server.pem" -inkey "$TLS/server.key" \
      -certfile "$TLS/ca.pem" -out "$TLS/kafka.p12" -passout "file:$SECRETS/kafka-keystore.password" &&
      keytool -importcert -noprompt -alias stack-ca -file "$TLS/ca.pem" -storetype PKCS12 \
        -keystore "$TLS/kafka-truststore.p12" -storepass:file "$SECRETS/kafka-keystore.password" &&
      keytool -list -storetype PKCS12 -keystore "$TLS/kafka.p12" \
        -storepass:file "$SECRETS/kafka-keystore.password"
  } >>"$LOGS/install.log" 2>&1 || die "kafka-sasl: could not build its keystores (see $LOGS/install.log)"
  chmod 600 "$TLS/kafka.p12" "$TLS/kafka-truststore.p12"
}

configure_kafka-sasl() {
  local pair keystore_password
  ensure_tls
  for pair in "${KAFKA_SASL_USERS[@]}"; do ensure_password "${pair#*:}"; done
  ensure_kafka_keystores
  keystore_password=$(cat "$SECRETS/kafka-keystore.password")
  mkdir -p "$CONF/kafka-sasl" "$DATA/kafka-sasl"
  cp "$STACK_SRC/kafka-log4j.properties" "$CONF/kafka-sasl/log4j.properties"
  if [[ -f $DATA/kafka-sasl/meta.properties &&
    $(cat "$DATA/kafka-sasl/.users-sha256" 2>/dev/null) != "$(kafka_sasl_users_digest)" ]]; then
    die "kafka-sasl: its SCRAM users were made with other passwords than those in $SECRETS; remove $DATA/kafka-sasl (a new, empty cluster) or restore the password files"
  fi
  (
    umask 077
    cat >"$KAFKA_SASL_PROPS" <<EOF
# Generated by stack/stack.sh on every start; edit the script, not this file. Holds the
# keystore and the node's own password: mode 600.
# One KRaft node, broker and controller, loopback only, nothing open: clients log in with
# SCRAM-SHA-512 over TLS; the controller listener takes only the node's own certificate.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_SASL_CONTROLLER_PORT
listeners=SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT,CONTROLLER://127.0.0.1:$KAFKA_SASL_CONTROLLER_PORT
advertised.listeners=SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="kafka-broker" password="$(cat "$SECRETS/kafka-broker.password")";
listener.name.controller.ssl.client.auth=required
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS/kafka.p12
ssl.keystore.password=$keystore_password
ssl.key.password=$keystore_password
ssl.truststore.type=PKCS12
ssl.truststore.location=$TLS/kafka-truststore.p12
ssl.truststore.password=$keystore_password
# ACLs decide; nothing is allowed without one. Super users: the node (by its SCRAM user
# and by its certificate, on the controller listener) and stack-admin.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:kafka-broker;User:CN=localhost;User:stack-admin
log.dirs=$DATA/kafka-sasl

num.partitions=1
# As in production: topics are created on purpose (the pipeline creates only its
# dead-letter topic, with the Create ACL).
auto.create.topics.enable=false
delete.topic.enable=true
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
offsets.topic.num.partitions=10
transaction.state.log.num.partitions=10
group.initial.rebalance.delay.ms=0
log.retention.hours=720
EOF
    # For AclCommand and a developer's CLI calls (--command-config): stack-admin's login.
    cat >"$CONF/kafka-sasl/admin.properties" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="stack-admin" password="$(cat "$SECRETS/kafka-admin.password")";
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.pem
EOF
  )
}

# KRaft keeps SCRAM credentials in the metadata log, so the users are made where the
# storage is formatted (`--add-scram`), before the node first starts. The passwords are on
# the formatting JVM's command line for the second it runs (StorageTool reads them nowhere
# else); loopback, once per cluster.
format_kafka_sasl_storage() {
  [[ -f $DATA/kafka-sasl/meta.properties ]] && return 0
  local cluster_id pair scram=()
  cluster_id=$(new_kafka_cluster_id)
  for pair in "${KAFKA_SASL_USERS[@]}"; do
    scram+=(--add-scram "SCRAM-SHA-512=[name=${pair%%:*},password=$(cat "$SECRETS/${pair#*:}.password")]")
  done
  log "kafka-sasl: formatting storage in $DATA/kafka-sasl with SCRAM users ${KAFKA_SASL_USERS[*]%%:*}"
  java -Dlog4j.configuration="file:$CONF/kafka-sasl/log4j.properties" -cp "$KAFKA_JARS/*" \
    kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_SASL_PROPS" "${scram[@]}" \
    >>"$(log_file kafka-sasl)" 2>&1 || fail_with_log kafka-sasl "storage format failed"
  kafka_sasl_users_digest >"$DATA/kafka-sasl/.users-sha256"
  rm -f "$DATA/kafka-sasl/.acls-sha256"
}

# The pipeline user's ACLs, added as stack-admin once per cluster (and again when the list
# above changes; ACLs are only added, never removed). The three AclCommand JVMs run side by
# side; when the list is unchanged, nothing runs.
kafka_sasl_acls() {
  local digest stamp=$DATA/kafka-sasl/.acls-sha256 acl pids=() pid failed=0
  digest=$(printf '%s\n' "${KAFKA_SASL_ACLS[@]}" | sha256sum | cut -d' ' -f1)
  [[ $(cat "$stamp" 2>/dev/null) == "$digest" ]] && return 0
  log "kafka-sasl: granting search-features its ACLs"
  for acl in "${KAFKA_SASL_ACLS[@]}"; do
    # shellcheck disable=SC2086 # each entry is a list of AclCommand options
    java -Xmx256m -Dlog4j.configuration="file:$STACK_SRC/kafka-cli-log4j.properties" \
      -cp "$KAFKA_JARS/*" kafka.admin.AclCommand --bootstrap-server "127.0.0.1:$KAFKA_SASL_PORT" \
      --command-config "$CONF/kafka-sasl/admin.properties" --add \
      --allow-principal User:search-features $acl >>"$(log_file kafka-sasl)" 2>&1 9>&- &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  ((failed == 0)) || fail_with_log kafka-sasl "could not add the ACLs of search-features"
  echo "$digest" >"$stamp"
}

# OpenSearch refuses to run as root: root runs it as OPENSEARCH_USER (created on first use),
# anyone else simply as themselves.
opensearch_runas() {
  if [[ $(id -u) == 0 ]]; then
    echo runuser -u "$OPENSEARCH_USER" --
  fi
}

ensure_opensearch_user() {
  id -u "$OPENSEARCH_USER" >/dev/null 2>&1 && return 0
  log "opensearch: creating system user $OPENSEARCH_USER (OpenSearch refuses to run as root)"
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin "$OPENSEARCH_USER"
}

# What both OpenSearch nodes (SVC: opensearch, opensearch-secure) share: their dirs, a
# config dir of their own and jvm.options with the heap given.
opensearch_node_config() {
  local svc=$1 home=$2 conf=$3 version=$4 heap=$5
  mkdir -p "$conf" "$DATA/$svc" "$LOGS/$svc" "$RUN/$svc" "$TMP/$svc"
  # The config dir must be writable by OpenSearch (it creates its keystore there), so it is
  # a copy of the distribution's, not the distribution's own (refreshed on a version change).
  if [[ $(cat "$conf/.from-version" 2>/dev/null) != "$version" ]]; then
    cp -r "$home/config/." "$conf/"
    echo "$version" >"$conf/.from-version"
  fi
  # jvm.options names gc logs, heap dumps and crash logs relative to the working dir
  # (OpenSearch's home, owned by root): point them into the stack's logs and data.
  sed -E \
    -e "s#file=logs/gc\.log#file=$LOGS/$svc/gc.log#" \
    -e "s#^-XX:HeapDumpPath=data#-XX:HeapDumpPath=$DATA/$svc#" \
    -e "s#^-XX:ErrorFile=logs/#-XX:ErrorFile=$LOGS/$svc/#" \
    -e "s#^-Xms.*#-Xms$heap#" -e "s#^-Xmx.*#-Xmx$heap#" \
    "$home/config/jvm.options" >"$conf/jvm.options"
}

# Root runs OpenSearch as OPENSEARCH_USER: it gets everything the node writes; the
# distribution itself stays root-owned and read-only.
opensearch_node_owner() {
  local svc=$1 home=$2 conf=$3
  [[ $(id -u) == 0 ]] || return 0
  ensure_opensearch_user
  chown -R "$OPENSEARCH_USER:" "$conf" "$DATA/$svc" "$LOGS/$svc" "$RUN/$svc" "$TMP/$svc"
  # The user must be able to reach those paths (STACK_DIR under /root would not work).
  runuser -u "$OPENSEARCH_USER" -- test -r "$home/lib" -a -w "$DATA/$svc" ||
    die "$svc: user $OPENSEARCH_USER cannot reach $STACK_DIR; put STACK_DIR where other users can traverse"
}

configure_opensearch() {
  opensearch_node_config opensearch "$OS_HOME" "$OS_CONF" "$OPENSEARCH_VERSION" "$OPENSEARCH_HEAP"
  cat >"$OS_CONF/opensearch.yml" <<EOF
# Generated by stack/stack.sh on every start; edit the script, not this file.
cluster.name: search-features-local
node.name: local-1
network.host: 127.0.0.1
http.port: $OPENSEARCH_PORT
# single-node also skips the production bootstrap checks (vm.max_map_count and friends).
discovery.type: single-node
path.data: $DATA/opensearch
path.logs: $LOGS/opensearch
# CI disks are small and often past the 85/90 % watermarks, which would block writes.
cluster.routing.allocation.disk.threshold_enabled: false
# (cluster.default_number_of_replicas is set through the API, see opensearch_defaults.)
EOF
  opensearch_node_owner opensearch "$OS_HOME" "$OS_CONF"
}

# The secured OpenSearch's users (internal_users.yml, bcrypt hashes of the passwords in
# secrets/), each mapped to one role:
#   search-features  the pipeline's sink: the role below, nothing else
#   stack-admin      all_access (and the security REST API): tests, a developer's curl
# The stack's own calls (the health check, cluster settings, loading changed users and
# roles) use the admin certificate (tls/opensearch-admin.pem, plugins.security.authcz.admin_dn)
# instead, so they never depend on a password.
OPENSEARCH_SECURE_USERS=(search-features:opensearch-pipeline stack-admin:opensearch-admin)

# What the sink does (dataflow/opensearch/index.py and sink.py), on its aliases and the
# indices behind them: look up an alias or index, create the first index with its alias,
# read and extend the mapping, and write documents in _bulk (index and delete). The
# patterns are the default OPENSEARCH_INDEX and OPENSEARCH_AC_INDEX and everything that
# starts with them (their generations -000001, ..., and the tests' own aliases).
OPENSEARCH_SINK_INDEX_PATTERNS=("doc-features*" "ac-features*")
OPENSEARCH_SINK_INDEX_ACTIONS=(
  indices:admin/aliases/get
  indices:admin/get
  indices:admin/create
  indices:admin/aliases
  indices:admin/mappings/get
  indices:admin/mapping/put
  indices:data/write/bulk*
  indices:data/write/index
  indices:data/write/delete
)

# A bcrypt hash of secrets/NAME.password, made once by the plugin's tools/hash.sh (the
# password reaches it through its environment, never a command line) and kept in
# secrets/NAME.bcrypt with the password's SHA-256, so that it is made again only for a new
# password and the generated files stay the same from one start to the next.
opensearch_password_hash() {
  local name=$1 cache=$SECRETS/$1.bcrypt sum hash
  sum=$(password_sha256 "$name")
  if [[ -s $cache && $(cut -d' ' -f1 "$cache") == "$sum" ]]; then
    cut -d' ' -f2 "$cache"
    return 0
  fi
  hash=$(STACK_OPENSEARCH_PASSWORD=$(cat "$SECRETS/$name.password") \
    OPENSEARCH_JAVA_HOME="$(java_home)" \
    bash "$OSS_HOME/plugins/opensearch-security/tools/hash.sh" -env STACK_OPENSEARCH_PASSWORD \
    2>>"$LOGS/install.log" 9>&- | grep -E '^\$2[aby]\$' | tail -n 1) || true
  [[ -n $hash ]] || die "opensearch-secure: tools/hash.sh made no hash of $name's password (see $LOGS/install.log)"
  (umask 077 && printf '%s %s\n' "$sum" "$hash" >"$cache")
  echo "$hash"
}

# Every user's password (made when missing) and its bcrypt hash, the hashes of new
# passwords side by side (a JVM each); write_opensearch_security_config then reads them
# from secrets/*.bcrypt (and says so should one have failed). Only these pids are waited
# for: the services launched before run in the background of this shell.
opensearch_secure_passwords() {
  local pair pids=()
  for pair in "${OPENSEARCH_SECURE_USERS[@]}"; do
    ensure_password "${pair#*:}"
    opensearch_password_hash "${pair#*:}" >/dev/null 2>&1 9>&- &
    pids+=($!)
  done
  wait "${pids[@]}" || true
}

# The security plugin's configuration, written into DIR (opensearch-security/ of the node's
# config) on every start and every `up`: HTTP basic auth against the internal users only,
# no anonymous access, the users and roles above, and empty versions of the files the
# plugin's package fills with demo users, tenants and audit settings.
write_opensearch_security_config() {
  local dir=$1 pair user pattern action
  rm -rf "$dir.new"
  mkdir -p "$dir.new"
  (
    umask 077
    cd "$dir.new"
    cat >config.yml <<'EOF'
_meta:
  type: "config"
  config_version: 2
config:
  dynamic:
    http:
      anonymous_auth_enabled: false
    authc:
      basic_internal_auth_domain:
        description: "HTTP basic auth against the internal users (internal_users.yml)"
        http_enabled: true
        transport_enabled: true
        order: 0
        http_authenticator:
          type: basic
          challenge: true
        authentication_backend:
          type: intern
EOF
    {
      printf '_meta:\n  type: "internalusers"\n  config_version: 2\n'
      for pair in "${OPENSEARCH_SECURE_USERS[@]}"; do
        printf '%s:\n  hash: "%s"\n  reserved: true\n' "${pair%%:*}" "$(opensearch_password_hash "${pair#*:}")"
      done
    } >internal_users.yml
    {
      printf '_meta:\n  type: "roles"\n  config_version: 2\n'
      printf 'search-features-sink:\n  reserved: true\n'
      printf '  description: "The pipeline'"'"'s OpenSearch sink: its aliases and their indices"\n'
      printf '  cluster_permissions:\n    - "indices:data/write/bulk"\n'
      printf '  index_permissions:\n    - index_patterns:\n'
      for pattern in "${OPENSEARCH_SINK_INDEX_PATTERNS[@]}"; do printf '        - "%s"\n' "$pattern"; done
      printf '      allowed_actions:\n'
      for action in "${OPENSEARCH_SINK_INDEX_ACTIONS[@]}"; do printf '        - "%s"\n' "$action"; done
    } >roles.yml
    {
      printf '_meta:\n  type: "rolesmapping"\n  config_version: 2\n'
      printf 'all_access:\n  reserved: true\n  users:\n    - "stack-admin"\n'
      printf 'search-features-sink:\n  reserved: true\n  users:\n    - "search-features"\n'
    } >roles_mapping.yml
    for user in actiongroups:action_groups tenants:tenants nodesdn:nodes_dn; do
      printf '_meta:\n  type: "%s"\n  config_version: 2\n' "${user%%:*}" >"${user#*:}.yml"
    done
    printf '_meta:\n  type: "audit"\n  config_version: 2\nconfig:\n  enabled: false\n' >audit.yml
    # securityadmin.sh still asks for whitelist.yml, allowlist.yml's old name.
    for user in allowlist whitelist; do
      printf '_meta:\n  type: "%s"\n  config_version: 2\nconfig:\n  enabled: false\n' "$user" >"$user.yml"
    done
  )
  rm -rf "$dir" && mv "$dir.new" "$dir"
}

opensearch_security_digest() {
  cat "$OSS_CONF"/opensearch-security/*.yml | sha256sum | cut -d' ' -f1
}

# The node's certificate and key, and the CA, inside its config dir (where the plugin wants
# them); the admin certificate stays in tls/ for the stack's own calls.
ensure_opensearch_secure_certs() {
  ensure_tls
  ensure_signed_cert opensearch-node /CN=opensearch-secure \
    "subjectAltName=DNS:localhost,IP:127.0.0.1" "extendedKeyUsage=serverAuth,clientAuth"
  ensure_signed_cert opensearch-admin /CN=stack-admin "extendedKeyUsage=clientAuth"
  mkdir -p "$OSS_CONF/tls"
  (
    umask 077
    cp "$TLS/opensearch-node.pem" "$OSS_CONF/tls/node.pem"
    cp "$TLS/opensearch-node.key" "$OSS_CONF/tls/node.key"
    cp "$TLS/ca.pem" "$OSS_CONF/tls/ca.pem"
  )
}

configure_opensearch-secure() {
  opensearch_node_config opensearch-secure "$OSS_HOME" "$OSS_CONF" "$OPENSEARCH_SECURE_VERSION" \
    "$OPENSEARCH_SECURE_HEAP"
  ensure_opensearch_secure_certs
  opensearch_secure_passwords
  write_opensearch_security_config "$OSS_CONF/opensearch-security"
  # A node without data loads these files into its security index on its first start; with
  # data, it keeps the index it has (opensearch_secure_security compares the two).
  if [[ ! -d $DATA/opensearch-secure/nodes ]]; then
    opensearch_security_digest >"$DATA/opensearch-secure/.security-sha256"
  fi
  cat >"$OSS_CONF/opensearch.yml" <<EOF
# Generated by stack/stack.sh on every start; edit the script, not this file.
cluster.name: search-features-local-secure
node.name: local-secure-1
network.host: 127.0.0.1
http.port: $OPENSEARCH_SECURE_PORT
transport.port: $OPENSEARCH_SECURE_TRANSPORT_PORT
discovery.type: single-node
path.data: $DATA/opensearch-secure
path.logs: $LOGS/opensearch-secure
cluster.routing.allocation.disk.threshold_enabled: false

# The security plugin, configured here rather than by its demo installer. TLS on HTTP and
# on transport with the stack's CA; the PEM files are in tls/ of this directory (the plugin
# reads them only there), the key PKCS#8.
plugins.security.ssl.transport.pemcert_filepath: tls/node.pem
plugins.security.ssl.transport.pemkey_filepath: tls/node.key
plugins.security.ssl.transport.pemtrustedcas_filepath: tls/ca.pem
plugins.security.ssl.http.enabled: true
plugins.security.ssl.http.pemcert_filepath: tls/node.pem
plugins.security.ssl.http.pemkey_filepath: tls/node.key
plugins.security.ssl.http.pemtrustedcas_filepath: tls/ca.pem
# Only this node's certificate may join; only the admin certificate (tls/opensearch-admin.pem)
# may change the security configuration (securityadmin.sh) or skip authentication.
plugins.security.nodes_dn:
  - "CN=opensearch-secure"
plugins.security.authcz.admin_dn:
  - "CN=stack-admin"
# On the first start, opensearch-security/ becomes the security index.
plugins.security.allow_default_init_securityindex: true
plugins.security.restapi.roles_enabled: ["all_access"]
plugins.security.system_indices.enabled: true
plugins.security.audit.type: noop
EOF
  opensearch_node_owner opensearch-secure "$OSS_HOME" "$OSS_CONF"
  # The plugin warns about a config dir that others may read (it holds the node's key).
  chmod -R go= "$OSS_CONF"
}

# `up` on a running opensearch-secure: the files again, for opensearch_secure_security.
refresh_opensearch-secure() {
  opensearch_secure_passwords
  write_opensearch_security_config "$OSS_CONF/opensearch-security"
  if [[ $(id -u) == 0 ]]; then chown -R "$OPENSEARCH_USER:" "$OSS_CONF/opensearch-security"; fi
}

# curl against one of the OpenSearch nodes; the secured one over TLS verified against the
# stack's CA, authenticated by the admin certificate.
os_curl() {
  local svc=$1 path=$2
  shift 2
  if [[ $svc == opensearch-secure ]]; then
    curl -fsS --cacert "$TLS/ca.pem" --cert "$TLS/opensearch-admin.pem" \
      --key "$TLS/opensearch-admin.key" "$@" "https://127.0.0.1:$OPENSEARCH_SECURE_PORT$path"
  else
    curl -fsS "$@" "http://127.0.0.1:$OPENSEARCH_PORT$path"
  fi
}

# Once the secured node is healthy: when its security index was loaded from other files
# than the current ones (users, roles or passwords changed since), load these with the
# plugin's securityadmin.sh and the admin certificate; then make sure stack-admin's
# password is accepted (the password goes to curl on its stdin, never on a command line).
opensearch_secure_security() {
  local stamp=$DATA/opensearch-secure/.security-sha256 digest
  digest=$(opensearch_security_digest)
  if [[ $(cat "$stamp" 2>/dev/null) != "$digest" ]]; then
    log "opensearch-secure: loading the changed users and roles (securityadmin.sh)"
    OPENSEARCH_JAVA_HOME="$(java_home)" bash "$OSS_HOME/plugins/opensearch-security/tools/securityadmin.sh" \
      -cd "$OSS_CONF/opensearch-security" -icl -h 127.0.0.1 -p "$OPENSEARCH_SECURE_PORT" \
      -cacert "$TLS/ca.pem" -cert "$TLS/opensearch-admin.pem" -key "$TLS/opensearch-admin.key" \
      >>"$(log_file opensearch-secure)" 2>&1 9>&- ||
      fail_with_log opensearch-secure "securityadmin.sh could not load the users and roles"
    echo "$digest" >"$stamp"
  fi
  printf 'user = "stack-admin:%s"\n' "$(cat "$SECRETS/opensearch-admin.password")" |
    curl -fsS --max-time 10 -K - --cacert "$TLS/ca.pem" -o /dev/null \
      "https://127.0.0.1:$OPENSEARCH_SECURE_PORT/_plugins/_security/authinfo" 2>/dev/null ||
    fail_with_log opensearch-secure "stack-admin cannot log in with $SECRETS/opensearch-admin.password"
}

# One node cannot place a replica, so by default every new index would stay yellow and
# wait_for_status=green would hang. With a default of 0 they are green; an index can still
# ask for replicas. It has to be a persistent cluster setting: OpenSearch 2.19 ignores this
# one in opensearch.yml when creating an index (it reads only the cluster metadata).
opensearch_defaults() {
  local svc=$1
  os_curl "$svc" "/_cluster/settings?flat_settings=true" --max-time 10 |
    grep -q '"cluster.default_number_of_replicas":"0"' && return 0
  os_curl "$svc" /_cluster/settings --max-time 30 -X PUT -H 'Content-Type: application/json' \
    -d '{"persistent":{"cluster.default_number_of_replicas":0}}' >/dev/null ||
    fail_with_log "$svc" "could not set cluster.default_number_of_replicas"
}

# Written on every start and every `up`; a running Prometheus is told to reload when it changed.
write_prometheus_config() {
  local out=$1 targets="" port
  IFS=, read -ra ports <<<"$METRICS_PORTS"
  for port in "${ports[@]}"; do
    port=${port// /}
    [[ -n $port ]] && targets+="${targets:+, }'127.0.0.1:$port'"
  done
  cat >"$out" <<EOF
# Generated by stack/stack.sh; edit the script, not this file.
global:
  # Short intervals so that tests see a scrape or a rule evaluation within seconds.
  scrape_interval: 2s
  scrape_timeout: 2s
  evaluation_interval: 2s

# The glob may match nothing yet; Prometheus accepts that.
rule_files:
  - '$REPO_DIR/ops/prometheus/*.rules.yml'

scrape_configs:
  # The pipeline's metrics endpoints (METRICS_PORTS); "down" until a pipeline runs.
  - job_name: search-features
    static_configs:
      - targets: [$targets]
  - job_name: prometheus
    static_configs:
      - targets: ['127.0.0.1:$PROMETHEUS_PORT']
EOF
}

# promtool also checks every rule file the glob matches; its output names the bad one.
check_prometheus_config() {
  local out
  out=$(promtool check config "$1" 2>&1) || die "prometheus: invalid config or rule files:
$out"
}

configure_prometheus() {
  mkdir -p "$CONF/prometheus" "$DATA/prometheus"
  write_prometheus_config "$PROM_CONF"
  check_prometheus_config "$PROM_CONF"
}

# --------------------------------------------------------------------------- launchers
# Every launcher detaches the service (setsid, stdin from /dev/null, output to its log) and
# closes fd 9, the stack lock, which a long-lived child would otherwise hold forever.

# Runs "$@" detached in its own session. The wrapper shell writes its own pid and then execs
# the command, so the pid file names the service process itself, not a wrapper.
spawn() {
  local pidfile=$1 logf=$2
  shift 2
  # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$logf" 2>&1 9>&- &
}

launch_kafka() {
  format_kafka_storage
  # KAFKA_HEAP_OPTS is a list of JVM flags: unquoted on purpose.
  # shellcheck disable=SC2086
  spawn "$(pid_file kafka)" "$(log_file kafka)" \
    java $KAFKA_HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$CONF/kafka/log4j.properties" \
    -Dkafka.logs.dir="$LOGS" \
    -cp "$KAFKA_JARS/*" kafka.Kafka "$KAFKA_PROPS"
}

launch_kafka-sasl() {
  format_kafka_sasl_storage
  # shellcheck disable=SC2086
  spawn "$(pid_file kafka-sasl)" "$(log_file kafka-sasl)" \
    java $KAFKA_HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$CONF/kafka-sasl/log4j.properties" \
    -Dkafka.logs.dir="$LOGS" \
    -cp "$KAFKA_JARS/*" kafka.Kafka "$KAFKA_SASL_PROPS"
}

launch_redis() {
  # Redis daemonizes itself and writes its pid file. No snapshots: the feature store is
  # rebuilt from Kafka, and a stale dump.rdb would only confuse tests after a restart.
  # Our redirect only catches errors printed before it daemonizes and opens --logfile.
  # shellcheck disable=SC2094
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode yes \
    --daemonize yes --pidfile "$(pid_file redis)" \
    --dir "$DATA/redis" --logfile "$(log_file redis)" \
    --save "" --appendonly no \
    </dev/null >>"$(log_file redis)" 2>&1 9>&- ||
    fail_with_log redis "redis-server did not start"
}

launch_redis-tls() {
  # shellcheck disable=SC2094
  redis-server "$REDIS_TLS_CONF" </dev/null >>"$(log_file redis-tls)" 2>&1 9>&- ||
    fail_with_log redis-tls "redis-server did not start"
}

# SVC (opensearch, opensearch-secure) from HOME with its config dir CONF.
launch_opensearch_node() {
  local svc=$1 home=$2 conf=$3 runas pidfile
  pidfile=$(pid_file "$svc")
  read -ra runas <<<"$(opensearch_runas)"
  rm -f "$pidfile"
  # Its start script runs bin/opensearch-keystore by a relative path, so start it from its
  # home. env -i: nothing from the caller's environment (JAVA_OPTS, a venv) leaks in.
  (
    cd "$home"
    setsid "${runas[@]}" env -i \
      PATH=/usr/local/bin:/usr/bin:/bin \
      OPENSEARCH_JAVA_HOME="$(java_home)" \
      OPENSEARCH_PATH_CONF="$conf" \
      OPENSEARCH_TMPDIR="$TMP/$svc" \
      OPENSEARCH_JAVA_OPTS="${OPENSEARCH_JAVA_OPTS:-}" \
      "$home/bin/opensearch" -p "$pidfile" \
      </dev/null >>"$(log_file "$svc")" 2>&1 9>&- &
  )
}

launch_opensearch() { launch_opensearch_node opensearch "$OS_HOME" "$OS_CONF"; }

launch_opensearch-secure() { launch_opensearch_node opensearch-secure "$OSS_HOME" "$OSS_CONF"; }

launch_prometheus() {
  spawn "$(pid_file prometheus)" "$(log_file prometheus)" \
    prometheus --config.file="$PROM_CONF" \
    --storage.tsdb.path="$DATA/prometheus" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
    --web.enable-lifecycle
}

# Until the JVM writes it, OpenSearch's pid file is missing; give the launcher a moment so
# that the "died during startup" check in wait_healthy does not fire too early.
wait_for_pidfile() {
  local svc=$1 i
  for ((i = 0; i < 120; i++)); do
    svc_pid "$svc" >/dev/null && return 0
    # While its start script (or runuser) still runs, the JVM is on its way.
    if [[ $svc == opensearch* ]] && pgrep -f -- "$(pid_file "$svc")" >/dev/null; then
      sleep 0.5
      continue
    fi
    ((i < 10)) || break
    sleep 0.5
  done
  svc_pid "$svc" >/dev/null || fail_with_log "$svc" "the process exited right after it was launched"
}

# --------------------------------------------------------------------------- start/stop

# Starts a service unless our instance already runs. Waits for nothing: see start_services.
start_one() {
  local svc=$1 pid port
  if pid=$(svc_pid "$svc"); then
    log "$svc: already running (pid $pid)"
    [[ $svc == prometheus ]] && refresh_prometheus "$pid"
    [[ $svc == redis-tls ]] && refresh_redis-tls
    [[ $svc == opensearch-secure ]] && refresh_opensearch-secure
    return 0
  fi
  port=$(port_of "$svc")
  if port_busy "$port"; then
    die "$svc: port $port is taken by $(port_listener "$port"), which is not this stack's $svc; stop it or set $(port_var_of "$svc")"
  fi
  if [[ $svc == kafka ]] && port_busy "$KAFKA_CONTROLLER_PORT"; then
    die "kafka: controller port $KAFKA_CONTROLLER_PORT is taken by $(port_listener "$KAFKA_CONTROLLER_PORT"); stop it or set KAFKA_CONTROLLER_PORT"
  fi
  if [[ $svc == kafka-sasl ]] && port_busy "$KAFKA_SASL_CONTROLLER_PORT"; then
    die "kafka-sasl: controller port $KAFKA_SASL_CONTROLLER_PORT is taken by $(port_listener "$KAFKA_SASL_CONTROLLER_PORT"); stop it or set KAFKA_SASL_CONTROLLER_PORT"
  fi
  if [[ $svc == opensearch-secure ]] && port_busy "$OPENSEARCH_SECURE_TRANSPORT_PORT"; then
    die "opensearch-secure: transport port $OPENSEARCH_SECURE_TRANSPORT_PORT is taken by $(port_listener "$OPENSEARCH_SECURE_TRANSPORT_PORT"); stop it or set OPENSEARCH_SECURE_TRANSPORT_PORT"
  fi
  mkdir -p "$RUN" "$LOGS"
  "configure_$svc"
  log_banner "$svc"
  log "$svc: starting on 127.0.0.1:$port (log $(log_file "$svc"))"
  "launch_$svc"
}

# `up` regenerates the scrape config (METRICS_PORTS may differ); reload only on a change.
refresh_prometheus() {
  local pid=$1 fresh=$TMP/prometheus.yml.new
  mkdir -p "$TMP"
  write_prometheus_config "$fresh"
  if cmp -s "$fresh" "$PROM_CONF"; then
    rm -f "$fresh"
    return 0
  fi
  check_prometheus_config "$fresh"
  mv "$fresh" "$PROM_CONF"
  log "prometheus: config changed, reloading (pid $pid)"
  kill -HUP "$pid"
}

reload_prometheus() {
  local pid
  pid=$(svc_pid prometheus) || die "prometheus is not running; run 'stack/stack.sh up'"
  mkdir -p "$TMP"
  write_prometheus_config "$TMP/prometheus.yml.new"
  check_prometheus_config "$TMP/prometheus.yml.new"
  mv "$TMP/prometheus.yml.new" "$PROM_CONF"
  # The HTTP endpoint answers only after the reload finished, and says whether it worked.
  curl -fsS -X POST --max-time 30 "http://127.0.0.1:$PROMETHEUS_PORT/-/reload" ||
    fail_with_log prometheus "reload failed"
  log "prometheus: reloaded config and rule files (pid $pid)"
}

stop_one() {
  local svc=$1 pid deadline
  if ! pid=$(svc_pid "$svc"); then
    log "$svc: not running"
    rm -f "$(pid_file "$svc")"
    return 0
  fi
  log "$svc: stopping (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  if pid_alive "$pid"; then
    log "$svc: still running after ${STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while pid_alive "$pid"; do sleep 0.1; done
  fi
  rm -f "$(pid_file "$svc")"
}

start_services() {
  local svc
  install_services "$@"
  # Launch everything first and wait afterwards: the JVMs start up in parallel.
  for svc in "$@"; do start_one "$svc"; done
  for svc in "$@"; do
    wait_for_pidfile "$svc"
    wait_healthy "$svc"
    if [[ $svc == opensearch ]]; then opensearch_defaults opensearch; fi
    if [[ $svc == opensearch-secure ]]; then
      opensearch_secure_security
      opensearch_defaults opensearch-secure
    fi
    if [[ $svc == kafka-sasl ]]; then kafka_sasl_acls; fi
    log "$svc: healthy on 127.0.0.1:$(port_of "$svc")"
  done
}

status_line() {
  local svc=$1 pid state
  if pid=$(svc_pid "$svc"); then
    if healthy "$svc"; then state=running; else state="running (not ready)"; fi
  else
    pid=- state=stopped
  fi
  printf '%-17s %-20s port %-6s pid %-8s log %s\n' "$svc" "$state" "$(port_of "$svc")" "$pid" "$(log_file "$svc")"
}

# --------------------------------------------------------------------------- commands

# One stack-changing command at a time: two `up`s racing would start a service twice.
take_lock() {
  mkdir -p "$RUN"
  exec 9>"$RUN/stack.lock"
  flock -w 600 9 || die "another stack.sh holds $RUN/stack.lock"
}

services_from_args() {
  local svc
  (($#)) || die "name a service: ${SERVICES[*]}"
  for svc in "$@"; do is_service "$svc" || die "unknown service '$svc' (known: ${SERVICES[*]})"; done
}

usage() {
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# Where a client of the secured side finds what it needs (no password is printed).
secured_info() {
  cat <<EOF
CA certificate (REDIS_CA_FILE, KAFKA_SSL_CA_LOCATION, OPENSEARCH_CA_FILE): $TLS/ca.pem
kafka-sasl 127.0.0.1:$KAFKA_SASL_PORT SASL_SSL, SCRAM-SHA-512
           user search-features  password file $SECRETS/kafka-pipeline.password
           user stack-admin      password file $SECRETS/kafka-admin.password
           CLI login (--command-config): $CONF/kafka-sasl/admin.properties
redis-tls  rediss://search-features@127.0.0.1:$REDIS_TLS_PORT/0  password file $SECRETS/redis-pipeline.password
           rediss://ranking@127.0.0.1:$REDIS_TLS_PORT/0          password file $SECRETS/redis-reader.password
           rediss://stack-admin@127.0.0.1:$REDIS_TLS_PORT/0      password file $SECRETS/redis-admin.password
opensearch-secure https://127.0.0.1:$OPENSEARCH_SECURE_PORT (OPENSEARCH_CA_FILE: the CA above), OpenSearch $OPENSEARCH_SECURE_VERSION with the security plugin
           user search-features  password file $SECRETS/opensearch-pipeline.password
           user stack-admin      password file $SECRETS/opensearch-admin.password
           admin certificate $TLS/opensearch-admin.pem, key $TLS/opensearch-admin.key
EOF
}

main() {
  local cmd=${1:-}
  (($#)) && shift
  # start-opensearch, stop-kafka, ... are spellings of "start opensearch", "stop kafka".
  if [[ $cmd =~ ^(start|stop|restart)-(.+)$ ]]; then
    cmd=${BASH_REMATCH[1]}
    set -- "${BASH_REMATCH[2]}" "$@"
  fi
  case $cmd in
    up)
      take_lock
      if (($#)); then services_from_args "$@"; else set -- "${SERVICES[@]}"; fi
      local started=$SECONDS
      start_services "$@"
      log "stack is up (${STACK_DIR}, $((SECONDS - started))s)"
      ;;
    down)
      take_lock
      local svc
      # Reverse order: Prometheus and OpenSearch first, Kafka last (its shutdown is slowest).
      for svc in prometheus opensearch-secure opensearch redis-tls redis kafka-sasl kafka; do stop_one "$svc"; done
      ;;
    start)
      take_lock
      services_from_args "$@"
      start_services "$@"
      ;;
    stop)
      take_lock
      services_from_args "$@"
      local svc
      for svc in "$@"; do stop_one "$svc"; done
      ;;
    restart)
      take_lock
      services_from_args "$@"
      local svc
      for svc in "$@"; do stop_one "$svc"; done
      start_services "$@"
      ;;
    status)
      local svc
      for svc in "${SERVICES[@]}"; do status_line "$svc"; done
      ;;
    reload-prometheus | reload)
      take_lock
      reload_prometheus
      ;;
    logs)
      services_from_args "${1:-}"
      tail -n "${2:-50}" "$(log_file "$1")"
      ;;
    kafka-class)
      (($#)) || die "usage: stack.sh kafka-class MAIN.Class [ARGS...]"
      [[ -f $KAFKA_JARS/.complete ]] || die "Kafka jars are not installed yet; run 'stack/stack.sh up'"
      # CLI tools log to stderr at WARN so their stdout stays parseable.
      exec java -Xmx256m -Dlog4j.configuration="file:$STACK_SRC/kafka-cli-log4j.properties" \
        -cp "$KAFKA_JARS/*" "$@"
      ;;
    secured) secured_info ;;
    -h | --help | help) usage ;;
    *)
      [[ -n $cmd ]] && printf "[stack] ERROR: unknown command '%s'\n\n" "$cmd" >&2
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
