# Sourced by bench/pg.sh and bench/serve_pg.sh: starts a throwaway
# PostgreSQL server (Debian's binaries, its defaults: fsync and
# synchronous_commit on; Unix socket only) in a temporary directory $work,
# stopped and removed at exit, and defines db(), which creates a new empty
# database and prints its URL.
bin="$(dirname "$(command -v initdb 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")"
work="$(mktemp -d)"
as=()
if [ "$(id -u)" -eq 0 ]; then chown postgres "$work"; as=(runuser -u postgres --); fi
cleanup() { "${as[@]}" "$bin/pg_ctl" -D "$work/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
"${as[@]}" "$bin/initdb" -D "$work/data" -U cloister --auth=trust -E UTF8 --no-instructions >/dev/null
"${as[@]}" mkdir "$work/sock"
"${as[@]}" "$bin/pg_ctl" -D "$work/data" -l "$work/server.log" \
  -o "-k $work/sock -c listen_addresses=" -w start >/dev/null
db() {  # a new empty database (called in a subshell: the name must be unique by itself)
  local name="bench$(date +%s%N)"
  psql -h "$work/sock" -U cloister -d postgres -Atqc "CREATE DATABASE $name" >/dev/null
  echo "postgresql:///$name?host=$work/sock&user=cloister"
}

