#!/usr/bin/env bash
# Serving benchmark (issue 20, docs/BENCHMARKS.md): predictions/s and
# latency of a deployment through the full chain (text-normalize +
# hashed-ngrams + logreg on SpamAssassin), single-record and 64-record
# requests, over HTTP (`cloister serve`, wrk on loopback, client token:
# every request authenticated, authorized and durably audited) against the
# same calls in-process without HTTP (serve-bench, 32 threads as wrk has 32
# connections), in one run; then the
# same single-record load while an operator sets a candidate's weight,
# promotes it and rolls back, counting failed requests.
# Needs wrk (apt-get install wrk). Usage: bench/serve.sh [SECONDS]
# CLOISTER_BIN=path serves with another `cloister` binary (an A/B of two
# builds; the environment is still made by the release build's).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-15}"
cargo build --release -j2 -p cloister -p cloister-bench --bin cloister --bin serve-bench
bin=target/release/cloister
served="${CLOISTER_BIN:-$bin}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
if [ -n "${KEEP:-}" ]; then echo "environment kept in $work"; fi
tok() { grep -o 'clt_[0-9a-f]*' | head -1; }
root=$($bin init "$work/env" 2>&1 | tok)
export CLOISTER_ENV="$work/env"
as() { local t=$1; shift; CLOISTER_TOKEN=$t $bin "$@"; }
sci=$(as "$root" user add sci --role scientist | tok)
rev=$(as "$root" user add rev --role reviewer | tok)
appr=$(as "$root" user add appr --role approver | tok)
op=$(as "$root" user add op --role operator | tok)
app=$(as "$root" user add app --role client | tok)
as "$sci" dataset import spam data/spamassassin/spamassassin.jsonl.gz >/dev/null
as "$root" plugin bundled --write "$work/wasm" >/dev/null
digest() { as "$sci" plugin add "$work/wasm/$1.wasm" | grep -o 'sha256:[0-9a-f]*' | cut -d: -f2; }
norm=$(digest text-normalize); ngrams=$(digest hashed-ngrams)
as "$rev" plugin approve "$norm" >/dev/null; as "$rev" plugin approve "$ngrams" >/dev/null
model() { as "$sci" train --dataset spam --preprocess "$norm" --features "$ngrams" --template logreg --set "seed=$1" 2>/dev/null | awk '/^trained/ {print $2}'; }
a=$(model 0); b=$(model 1)
for m in "$a" "$b"; do
  as "$sci" model request-release "$m" --reason bench >/dev/null
  as "$appr" model approve-release "$m" >/dev/null
done
as "$op" deploy create spam --model "$a" --client app >/dev/null
# The regression gate: the candidate's signed pass on the labeled corpus,
# without which the policies hold it at 5% of the traffic.
as "$op" deploy test spam --candidate "$b" --dataset spam >/dev/null
if [ -n "${KEEP:-}" ]; then printf 'root=%s\napp=%s\nop=%s\n' "$root" "$app" "$op" > "$work/tokens"; fi
# Request bodies: 1 and 64 records of the corpus (texts cut to 2,000 chars).
python3 - "$work" <<'PY'
import gzip, json, sys
work = sys.argv[1]
recs = [json.loads(l) for l in gzip.open("data/spamassassin/spamassassin.jsonl.gz", "rt")]
recs = [{"id": r["id"], "text": r["text"][:2000]} for r in recs[:512]]
with open(f"{work}/records.jsonl", "w") as f:
    for r in recs: f.write(json.dumps(r) + "\n")
for n in (1, 64):
    body = json.dumps({"records": recs[:n]})
    with open(f"{work}/post{n}.lua", "w") as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
        f.write("wrk.body = " + json.dumps(body) + "\n")
        f.write('done = function(summary, latency, requests)\n  io.write(string.format("non-2xx or socket errors: %d\\n", summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))\nend\n')
PY
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "command: bench/serve.sh $secs"
echo
for n in 1 64; do
  target/release/serve-bench --env "$work/env" --token "$app" --deployment spam \
    --input "$work/records.jsonl" --records $n --threads 32 --seconds "$secs"
done
echo "served by: $served"
$served serve --addr 127.0.0.1:18090 2>/dev/null &
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/18090) 2>/dev/null && break; sleep 0.1; done
url=http://127.0.0.1:18090/api/deployments/spam/predict
# One request first: the server loads the model and its chain once.
curl -s -o /dev/null -X POST -H "Authorization: Bearer $app" -H 'Content-Type: application/json' \
  -d '{"records":[{"id":"warm","text":"hello"}]}' "$url"
for n in 1 64; do
  echo
  echo "## HTTP, $n record(s) per request (wrk -t2 -c32 -d${secs}s)"
  wrk -t2 -c32 -d"${secs}s" --latency -s "$work/post$n.lua" -H "Authorization: Bearer $app" "$url"
done
echo
echo "## HTTP, 1 record per request, while the operator ramps, promotes and rolls back"
change() { curl -s -o /dev/null -w "%{http_code} " -X POST -H "Authorization: Bearer $op" -H 'Content-Type: application/json' \
  -d "$1" http://127.0.0.1:18090/api/deployments/spam/change; }
wrk -t2 -c32 -d"${secs}s" --latency -s "$work/post1.lua" -H "Authorization: Bearer $app" "$url" > "$work/changes.txt" &
w=$!
step=$(( secs / 5 )); [ "$step" -lt 1 ] && step=1
sleep "$step"; change "{\"action\":\"set-weight\",\"model\":\"$b\",\"weight\":2500}"
sleep "$step"; change "{\"action\":\"set-weight\",\"model\":\"$b\",\"weight\":7500}"
sleep "$step"; change "{\"action\":\"promote\",\"model\":\"$b\"}"
sleep "$step"; change '{"action":"rollback"}'
echo "(operator changes answered: see the HTTP codes above)"
wait $w
cat "$work/changes.txt"
curl -s -H "Authorization: Bearer $op" "http://127.0.0.1:18090/api/deployments/spam?minutes=60" | python3 -c '
import json, sys
d = json.load(sys.stdin)
for v in d["variants"]:
    print("{:9} {} requests {} error rate {} p99 {} ms".format(v["role"], v["model"], v["requests"], v["error_rate"], v["p99_ms"]))
print("history:", [h["what"].split(" ")[0] for h in d["deployment"]["history"]])'
kill %1 2>/dev/null || true; sleep 1
echo "audit log after the run: $(CLOISTER_TOKEN=$root $bin audit verify 2>&1 | head -1)"
