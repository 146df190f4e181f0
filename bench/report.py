"""Turns a bench/run.sh results file (JSON lines) into the tables of
BENCHMARKS.md, with eventgate's ratios against the best reference peer."""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
by = {(r["target"], r["label"]): r for r in rows}
peers = ["gorilla", "node"]


def get(target, label, key):
    r = by.get((target, label))
    return None if r is None else r.get(key)


def fmt(v, spec="{:.0f}"):
    return "-" if v is None else spec.format(v)


print("| target | scenario | deliveries/s | lost | dup | order | p50 ms | p99 ms | p99.9 ms | server CPU µs/delivery |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["mode"] in ("fanout", "latency", "stalled"):
        print(f"| {r['target']} | {r['label']} | {fmt(r.get('deliveries_per_sec'))} | {r['lost']} | {r['duplicated']} | "
              f"{r['order_violations']} | {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} | {r['latency_p999_ms']:.2f} | "
              f"{fmt(r.get('server_cpu_us_per_delivery'), '{:.2f}')} |")
print()
print("| target | idle connections | connected | RSS before MiB | RSS connected MiB | RSS per connection KiB | RSS after they left MiB |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if r["mode"] == "idle":
        print(f"| {r['target']} | {r['clients']} | {r['clients_connected']} | {fmt(r.get('server_rss_before_mib'), '{:.1f}')} | "
              f"{fmt(r.get('server_rss_connected_mib'), '{:.1f}')} | {fmt(r.get('server_rss_per_conn_kib'), '{:.2f}')} | "
              f"{fmt(r.get('server_rss_after_close_mib'), '{:.1f}')} |")
print()
def median_of(target, prefix, key):
    """The median of `key` over the repeated runs `prefix-r1`, `prefix-r2`, …"""
    vals = sorted(r[key] for r in rows
                  if r["target"] == target and r["label"].startswith(prefix + "-r") and r.get(key) is not None)
    return vals[len(vals) // 2] if vals else None


print("| target | run | stalled closed by server | closed s after its buffers filled | fast clients lost | fast p99 ms with stalled | RSS cold/before/peak/after MiB |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if r["mode"] == "stalled":
        print(f"| {r['target']} | {r['label']} | {r['stalled_closed_by_server']} | {fmt(r.get('stalled_closed_after_full_secs'), '{:.1f}')} | {r['lost']} | "
              f"{r['latency_p99_ms']:.2f} | {fmt(r.get('server_rss_cold_mib'), '{:.1f}')}/{fmt(r.get('server_rss_before_mib'), '{:.1f}')}/"
              f"{fmt(r.get('server_rss_peak_during_mib'), '{:.1f}')}/{fmt(r.get('server_rss_after_mib'), '{:.1f}')} |")
print()
print("| target | fast p99 ms alone (median of 3) | with a stalled client (median of 3) | ratio |")
print("|---|---|---|---|")
for t in ["eventgate"] + peers:
    alone, stalled = median_of(t, "fast10-5000", "latency_p99_ms"), median_of(t, "stalled-5000", "latency_p99_ms")
    if alone and stalled:
        print(f"| {t} | {alone:.2f} | {stalled:.2f} | {stalled / alone:.2f}× |")


print()
print("Where one event's latency goes at 50 ev/s × 1000 (medians of 3): publish → its first client, → its last client")
print()
print("| target | first receipt p50 ms | last receipt p50 ms | last receipt p99 ms | server CPU µs/delivery |")
print("|---|---|---|---|---|")
for t in ["eventgate"] + peers + ["floor"]:
    vals = [median_of(t, "latency-50x1000", k) for k in
            ("event_first_p50_ms", "event_last_p50_ms", "event_last_p99_ms", "server_cpu_us_per_delivery")]
    if any(v is not None for v in vals):
        print(f"| {t} | " + " | ".join(fmt(v, "{:.2f}") for v in vals) + " |")

print()
print("Ratios, eventgate against the better peer of the same run:")
print()
print("| figure | eventgate | best peer | ratio | target |")
print("|---|---|---|---|---|")


def best(label, key, higher_is_better):
    vals = [(get(p, label, key), p) for p in peers if get(p, label, key) is not None]
    if not vals:
        return None, None
    return (max if higher_is_better else min)(vals)


def line(name, label, key, higher, target, peer_key=None, peer_label=None):
    mine = get("eventgate", label, key)
    theirs, who = best(peer_label or label, peer_key or key, higher)
    ratio = None if mine is None or not theirs else mine / theirs
    print(f"| {name} | {fmt(mine, '{:.2f}')} | {fmt(theirs, '{:.2f}')} ({who or '-'}) | {fmt(ratio, '{:.2f}')}× | {target} |")


line("deliveries/s, 1 × 1000", "fanout-1x1000", "deliveries_per_sec", True, "≥ 1.5×")
mine_cpu = get("eventgate", "fanout-1x1000", "server_cpu_us_per_delivery")
_, fastest = best("fanout-1x1000", "deliveries_per_sec", True)
their_cpu = get(fastest, "fanout-1x1000", "server_cpu_us_per_delivery") if fastest else None
ratio = None if mine_cpu is None or not their_cpu else mine_cpu / their_cpu
print(f"| server CPU µs per delivery, 1 × 1000 | {fmt(mine_cpu, '{:.2f}')} | {fmt(their_cpu, '{:.2f}')} ({fastest or '-'}) | {fmt(ratio, '{:.2f}')}× | ≤ 0.5× |")
line("deliveries/s, 100 × 10", "fanout-100x10", "deliveries_per_sec", True, "≥ 1.5×")
lat = {t: median_of(t, "latency-50x1000", "latency_p99_ms") for t in ["eventgate"] + peers + ["floor"]}
lat_peer = min(((v, p) for p, v in lat.items() if p in peers and v), default=(None, None))
lat_ratio = None if not lat["eventgate"] or not lat_peer[0] else lat["eventgate"] / lat_peer[0]
print(f"| p99 ms at 50 ev/s × 1000 (medians of 3) | {fmt(lat['eventgate'], '{:.2f}')} | "
      f"{fmt(lat_peer[0], '{:.2f}')} ({lat_peer[1] or '-'}) | {fmt(lat_ratio, '{:.2f}')}× | ≤ 0.5× |")
if lat["floor"] and lat_peer[0]:
    print(f"| p99 ms at 50 ev/s × 1000, the floor target (one write per client per event, nothing else) | "
          f"{fmt(lat['floor'], '{:.2f}')} | {fmt(lat_peer[0], '{:.2f}')} ({lat_peer[1]}) | {lat['floor'] / lat_peer[0]:.2f}× | (bound) |")
idle = next((r["label"] for r in rows if r["mode"] == "idle"), None)
if idle:
    line("RSS KiB per idle connection", idle, "server_rss_per_conn_kib", False, "≤ 1×")
alone = median_of("eventgate", "fast10-5000", "latency_p99_ms")
stalled = median_of("eventgate", "stalled-5000", "latency_p99_ms")
if alone and stalled:
    print(f"| fast p99 with a stalled client / without (medians of 3) | {stalled:.2f} | {alone:.2f} (eventgate alone) | {stalled / alone:.2f}× | ≤ 1.5× |")
before = median_of("eventgate", "stalled-5000", "server_rss_before_mib")
after = median_of("eventgate", "stalled-5000", "server_rss_after_mib")
if before and after:
    print(f"| RSS after a stalled run / before it, MiB (medians of 3) | {after:.1f} | {before:.1f} (eventgate before) | {after / before:.2f}× | ≈ 1× |")
cluster = by.get(("eventgate", "cluster2-fanout-1x1000"))
if cluster:
    print()
    print(f"Two nodes (PostgreSQL + NATS), clients split over both, published on one: "
          f"{cluster['deliveries_per_sec']:.0f} deliveries/s, lost {cluster['lost']}, dup {cluster['duplicated']}, "
          f"p99 {cluster['latency_p99_ms']:.2f} ms.")
