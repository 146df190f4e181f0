"""Turns a bench/run.sh results file (JSON lines) into the tables of
BENCHMARKS.md: every run, then eventgate's ratios against the best reference
peer of each row (gorilla, node, uws: whichever is best at that figure in
this run), and the table of targets of issue 17 where the run has the data.

    python3 bench/report.py bench/results/run-YYYYmmdd-HHMMSS.jsonl
"""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
by = {(r["target"], r["label"]): r for r in rows}
PEERS = ["gorilla", "node", "uws"]
peers = [p for p in PEERS if any(r["target"] == p for r in rows)]
targets = ["eventgate"] + peers
# Fixed-rate scenarios measured in interleaved rounds: label prefix, title.
LATENCY = [("latency-50x1000", "50 ev/s × 1000"), ("latency-150x1000", "150 ev/s × 1000")]


def fmt(v, spec="{:.0f}"):
    return "-" if v is None else spec.format(v)


def median_of(target, prefix, key):
    """The median of `key` over the repeated runs `prefix-r1`, `prefix-r2`, …"""
    vals = sorted(r[key] for r in rows
                  if r["target"] == target and r["label"].startswith(prefix + "-r") and r.get(key) is not None)
    return vals[len(vals) // 2] if vals else None


def value(target, label, key):
    """`key` of the run `label`, or the median over its rounds `label-rN`."""
    r = by.get((target, label))
    if r is not None:
        return r.get(key)
    return median_of(target, label, key)


def best(label, key, higher, among=None):
    """(value, peer) of the best peer at `key` in `label`, or (None, None)."""
    vals = [(value(p, label, key), p) for p in (among or peers)]
    vals = [(v, p) for v, p in vals if v is not None]
    if not vals:
        return None, None
    return (max if higher else min)(vals)


def ratio(mine, theirs):
    return None if mine is None or not theirs else mine / theirs


# --- every run ---------------------------------------------------------------
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
print("| target | run | stalled closed by server | closed s after its buffers filled | fast clients lost | fast p99 ms with stalled | RSS cold/before/peak/after MiB |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if r["mode"] == "stalled":
        print(f"| {r['target']} | {r['label']} | {r['stalled_closed_by_server']} | {fmt(r.get('stalled_closed_after_full_secs'), '{:.1f}')} | {r['lost']} | "
              f"{r['latency_p99_ms']:.2f} | {fmt(r.get('server_rss_cold_mib'), '{:.1f}')}/{fmt(r.get('server_rss_before_mib'), '{:.1f}')}/"
              f"{fmt(r.get('server_rss_peak_during_mib'), '{:.1f}')}/{fmt(r.get('server_rss_after_mib'), '{:.1f}')} |")
print()
print("| target | fast p99 ms alone (median of rounds) | with a stalled client (median of rounds) | ratio |")
print("|---|---|---|---|")
for t in targets:
    alone, stalled = median_of(t, "fast10-5000", "latency_p99_ms"), median_of(t, "stalled-5000", "latency_p99_ms")
    if alone and stalled:
        print(f"| {t} | {alone:.2f} | {stalled:.2f} | {stalled / alone:.2f}× |")

# --- latency at fixed rates, medians of the interleaved rounds -----------------
print()
print("Latency at a fixed rate (medians of the interleaved rounds): publish → any receipt, "
      "and per event publish → its first client, → its last client")
print()
print("| rate | target | p50 ms | p99 ms | p99.9 ms | first receipt p50 ms | last receipt p50 ms | last receipt p99 ms | lost | server CPU µs/delivery |")
print("|---|---|---|---|---|---|---|---|---|---|")
for prefix, title in LATENCY:
    for t in targets + ["floor"]:
        vals = [median_of(t, prefix, k) for k in
                ("latency_p50_ms", "latency_p99_ms", "latency_p999_ms", "event_first_p50_ms",
                 "event_last_p50_ms", "event_last_p99_ms")]
        if all(v is None for v in vals):
            continue
        lost = median_of(t, prefix, "lost")
        cpu = median_of(t, prefix, "server_cpu_us_per_delivery")
        print(f"| {title} | {t} | " + " | ".join(fmt(v, "{:.2f}") for v in vals) +
              f" | {fmt(lost)} | {fmt(cpu, '{:.2f}')} |")

# --- eventgate against the best peer, per row ------------------------------------
# Each cell compares eventgate with the peer that is best at that figure in
# that scenario (highest deliveries/s, lowest latency, CPU and RSS).
print()
print("eventgate against the best peer of each row (ratio = eventgate / best peer; "
      "the peer is chosen per figure):")
print()
print("| scenario | deliveries/s | × best | p50 ms | × best | p99 ms | × best | CPU µs/delivery | × best |")
print("|---|---|---|---|---|---|---|---|---|")
scenarios = [("fanout-1x1000", "1 × 1000, max rate"), ("fanout-100x10", "100 × 10, max rate")]
scenarios += [(p, t + " (medians)") for p, t in LATENCY]
scenarios += [("fast10-5000", "10 fast at 5,000 ev/s (medians)"), ("stalled-5000", "10 fast + 1 stalled (medians)")]
for label, title in scenarios:
    cells, any_data = [], False
    for key, higher, spec in (("deliveries_per_sec", True, "{:.0f}"), ("latency_p50_ms", False, "{:.2f}"),
                              ("latency_p99_ms", False, "{:.2f}"), ("server_cpu_us_per_delivery", False, "{:.2f}")):
        mine = value("eventgate", label, key)
        theirs, who = best(label, key, higher)
        any_data = any_data or mine is not None
        cells.append(fmt(mine, spec))
        cells.append(f"{fmt(ratio(mine, theirs), '{:.2f}×')} ({who})" if who else "-")
    if any_data:
        print(f"| {title} | " + " | ".join(cells) + " |")
idle = next((r["label"] for r in rows if r["mode"] == "idle" and r["target"] == "eventgate"), None)
if idle:
    mine = value("eventgate", idle, "server_rss_per_conn_kib")
    theirs, who = best(idle, "server_rss_per_conn_kib", False)
    print(f"\nRSS per idle connection ({idle}): eventgate {fmt(mine, '{:.2f}')} KiB, best peer "
          f"{fmt(theirs, '{:.2f}')} KiB ({who or '-'}): {fmt(ratio(mine, theirs), '{:.2f}×')}")

# --- the targets of issue 17 -------------------------------------------------------
print()
print("Targets (ratios against the best peer in each row, same run; medians of the rounds where latency is measured):")
print()
print("| figure | eventgate | best peer | ratio | target | verdict |")
print("|---|---|---|---|---|---|")


def verdict(v, limit, higher):
    if v is None:
        return "no data"
    return "met" if (v >= limit if higher else v <= limit) else "missed"


def target_row(name, label, key, higher, limit, among=None, spec="{:.2f}"):
    mine = value("eventgate", label, key)
    theirs, who = best(label, key, higher, among)
    r = ratio(mine, theirs)
    sign = "≥" if higher else "≤"
    peer = f"{fmt(theirs, spec)} ({who})" if who else "-"
    print(f"| {name} | {fmt(mine, spec)} | {peer} | {fmt(r, '{:.2f}×')} | "
          f"{sign} {limit}× | {verdict(r, limit, higher)} |")


def count_row(name, mine, limit_text, ok):
    print(f"| {name} | {fmt(mine)} | - | - | {limit_text} | {'no data' if mine is None else ('met' if ok else 'missed')} |")


target_row("deliveries/s, 1 × 1000, max rate", "fanout-1x1000", "deliveries_per_sec", True, 2.5, spec="{:.0f}")
lost = value("eventgate", "fanout-1x1000", "lost")
count_row("lost, 1 × 1000, max rate", lost, "0", lost == 0)
target_row("server CPU µs per delivery, 1 × 1000, max rate", "fanout-1x1000", "server_cpu_us_per_delivery", False, 0.5)
target_row("p50 ms publish → receive, 1 × 1000, max rate", "fanout-1x1000", "latency_p50_ms", False, 1.0)
target_row("p99 ms publish → receive, 1 × 1000, max rate", "fanout-1x1000", "latency_p99_ms", False, 1.0)
target_row("deliveries/s, 100 × 10, max rate", "fanout-100x10", "deliveries_per_sec", True, 2.0, spec="{:.0f}")
target_row("p99 ms, 100 × 10, max rate", "fanout-100x10", "latency_p99_ms", False, 1.5)
target_row("p99 ms at 50 ev/s × 1000", "latency-50x1000", "latency_p99_ms", False, 0.8)
target_row("server CPU µs per delivery at 50 ev/s × 1000 (against uws)", "latency-50x1000",
           "server_cpu_us_per_delivery", False, 1.0, among=["uws"])
target_row("p99 ms at 150 ev/s × 1000", "latency-150x1000", "latency_p99_ms", False, 0.8)
if idle:
    target_row(f"RSS KiB per idle connection ({idle}; against uws)", idle, "server_rss_per_conn_kib", False, 1.0,
               among=["uws"])
else:
    print("| RSS KiB per idle connection (against uws) | - | - | - | ≤ 1.0× | no data |")
# One stalled client among 10 fast ones: its fast clients lose nothing, their
# p99 stays within 1.2× of the same run without it, and RSS returns to its level.
stalled_runs = [r for r in rows if r["target"] == "eventgate" and r["label"].startswith("stalled-5000-r")]
lost_stalled = sum(r["lost"] for r in stalled_runs) if stalled_runs else None
count_row("stalled: events the fast clients lost (all rounds)", lost_stalled, "0", lost_stalled == 0)
alone = median_of("eventgate", "fast10-5000", "latency_p99_ms")
with_stalled = median_of("eventgate", "stalled-5000", "latency_p99_ms")
r = ratio(with_stalled, alone)
print(f"| stalled: fast p99 ms with it / without it (medians) | {fmt(with_stalled, '{:.2f}')} | "
      f"{fmt(alone, '{:.2f}')} (eventgate without it) | {fmt(r, '{:.2f}×')} | ≤ 1.2× | {verdict(r, 1.2, False)} |")
before = median_of("eventgate", "stalled-5000", "server_rss_before_mib")
after = median_of("eventgate", "stalled-5000", "server_rss_after_mib")
r = ratio(after, before)
print(f"| stalled: RSS MiB after the run / before it (medians) | {fmt(after, '{:.1f}')} | "
      f"{fmt(before, '{:.1f}')} (eventgate before) | {fmt(r, '{:.2f}×')} | back to its level (≤ 1.05×) | "
      f"{verdict(r, 1.05, False)} |")

cluster = by.get(("eventgate", "cluster2-fanout-1x1000"))
if cluster:
    print()
    print(f"Two nodes (PostgreSQL + NATS), clients split over both, published on one: "
          f"{cluster['deliveries_per_sec']:.0f} deliveries/s, lost {cluster['lost']}, dup {cluster['duplicated']}, "
          f"p99 {cluster['latency_p99_ms']:.2f} ms.")

# Nodes: 1, 2, 3 nodes, each with its own clients of one instance, published
# on the first (one load-tool process per node; their lines summed here).
node_runs = sorted({r["nodes"] for r in rows if r["mode"] == "nodes-traffic"})
if node_runs:
    print()
    print("Nodes (PostgreSQL + NATS), each with its own clients of one instance, published at max rate on the first:")
    print()
    print("| nodes | connections | events published/s | deliveries/s | lost | dup | p50 ms | p99 ms (worst node) | "
          "server CPU µs/delivery (all nodes) | RSS MiB per node, loaded | NATS bytes per event, sent / received | "
          "kernel TCP memory MiB, peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in node_runs:
        parts = [r for r in rows if r["mode"] == "fanout" and r["label"].startswith(f"nodes{n}-p")]
        traffic = by.get(("eventgate", f"nodes{n}-traffic"), {})
        if len(parts) != n:
            print(f"| {n} | {len(parts)} of {n} load processes reported | | | | | | | | | | |")
            continue
        window = max(r["recv_window_secs"] for r in parts)
        deliveries = sum(r["deliveries"] for r in parts)
        published = parts[0]["published"]
        cpu = sum(r.get("server_cpu_secs") or 0 for r in parts)
        rss = "/".join(fmt(r.get("server_rss_loaded_mib"), "{:.0f}") for r in parts)
        per_event = (f"{traffic.get('nats_bytes_sent', 0) / published:.0f} / "
                     f"{traffic.get('nats_bytes_received', 0) / published:.0f}") if published else "-"
        print(f"| {n} | {sum(r['clients_connected'] for r in parts)} | {published / parts[0]['publish_secs']:.1f} | "
              f"{deliveries / window:.0f} | {sum(r['lost'] for r in parts)} | {sum(r['duplicated'] for r in parts)} | "
              f"{max(r['latency_p50_ms'] for r in parts):.1f} | {max(r['latency_p99_ms'] for r in parts):.1f} | "
              f"{fmt(cpu * 1e6 / deliveries if deliveries else None, '{:.2f}')} | {rss} | {per_event} | "
              f"{traffic.get('tcp_mem_pages_peak', 0) * 4 / 1024:.0f} |")

# Reconnect storms (contract §12): every client drops while events are
# published, then reconnects, plainly and then with its position.
storms = [r for r in rows if r["mode"] == "storm" and r["target"] == "eventgate"]
if storms:
    print()
    print("Reconnect storms: every client drops while events are published, then reconnects "
          "(plain: no recovery; recovery: with its epoch and offset)")
    print()
    print("| run | clients | events | plain s | recovery s | ratio | target | clients done, p50 / p99 s (plain; recovery) | server CPU s plain / recovery | recovered true / false | lost | dup | out of order |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in storms:
        ra = ratio(r.get("recovery_secs"), r.get("plain_secs"))
        ok = (ra is not None and ra <= 1.5 and r.get("recovery_lost") == 0
              and r.get("recovery_duplicates") == 0)
        print(f"| {r['label']} | {r['clients']} | {r['storm_events']} | {fmt(r.get('plain_secs'), '{:.2f}')} | "
              f"{fmt(r.get('recovery_secs'), '{:.2f}')} | {fmt(ra, '{:.2f}×')} | ≤ 1.5×, 0 lost, 0 dup: "
              f"{'met' if ok else 'missed'} | {fmt(r.get('plain_p50_secs'), '{:.2f}')} / {fmt(r.get('plain_p99_secs'), '{:.2f}')}; "
              f"{fmt(r.get('recovery_p50_secs'), '{:.2f}')} / {fmt(r.get('recovery_p99_secs'), '{:.2f}')} | "
              f"{fmt(r.get('plain_server_cpu_secs'), '{:.2f}')} / "
              f"{fmt(r.get('recovery_server_cpu_secs'), '{:.2f}')} | {r.get('recovery_recovered_true')} / "
              f"{r.get('recovery_recovered_false')} | {r.get('recovery_lost')} | {r.get('recovery_duplicates')} | "
              f"{r.get('recovery_out_of_order')} |")

# Webhooks (contract §11) against the tool's own receiver, with the tool's raw
# POST rate to that receiver in the same invocation as the yardstick.
hooks = [r for r in rows if r["mode"] == "webhook" and r["target"] == "eventgate"]
if hooks:
    print()
    print("Webhooks: one enabled webhook, the load tool's receiver on 127.0.0.1 (200 at once)")
    print()
    print("| figure | " + " | ".join(r["label"] for r in hooks) + " | target |")
    print("|---|" + "---|" * len(hooks) + "---|")

    def hook_row(name, key, spec="{:.0f}", target=""):
        print(f"| {name} | " + " | ".join(fmt(r.get(key), spec) for r in hooks) + f" | {target} |")

    hook_row("raw POSTs/s (tool → receiver)", "raw_posts_per_sec")
    hook_row("raw p99 ms", "raw_p99_ms", "{:.3f}")
    hook_row("sustained deliveries/s", "sustained_deliveries_per_sec")
    hook_row("sustained / raw", "sustained_ratio_to_raw", "{:.3f}", "≥ 0.5")
    hook_row("sustained lost", "sustained_lost", target="0")
    hook_row("sustained duplicates", "sustained_duplicates", target="reported")
    hook_row("p99 ms at 20% of sustained", "fixed_p99_ms", "{:.2f}")
    hook_row("that p99 / raw p99", "fixed_p99_ratio_to_raw", "{:.1f}", "≤ 10")
    hook_row("publish events/s with the webhook", "publish_with_webhook_events_per_sec")
    hook_row("publish events/s without", "publish_without_webhook_events_per_sec")
    hook_row("with / without", "publish_ratio", "{:.3f}", "≥ 0.5")
    hook_row("backlog queued (receiver down)", "backlog_events")
    hook_row("RSS MiB before queueing", "backlog_rss_before_mib", "{:.1f}")
    hook_row("RSS MiB max while queued", "backlog_rss_max_mib", "{:.1f}", "flat")
    hook_row("backlog drain s", "backlog_drain_secs", "{:.1f}")
    hook_row("backlog drain deliveries/s", "backlog_drain_per_sec")
    hook_row("backlog lost", "backlog_lost", target="0")
    hook_row("SIGKILL restarts", "kills")
    hook_row("events acknowledged across them", "kills_acknowledged")
    hook_row("lost across them", "kills_lost", target="0")
    hook_row("duplicates across them", "kills_duplicates", target="reported")

# History's cost to clients that do not opt in: the same fan-out with the
# history off and on (medians of the interleaved rounds).
if any(r["label"].startswith("history0-") for r in rows):
    print()
    print("History's cost to clients that do not opt in (fan-out 1 × 1000, max rate, medians of the rounds)")
    print()
    print("| figure | history off | 1000 kept per instance | ratio | target |")
    print("|---|---|---|---|---|")
    for name, key, higher in [("deliveries/s", "deliveries_per_sec", True),
                              ("p50 ms", "latency_p50_ms", False),
                              ("p99 ms", "latency_p99_ms", False)]:
        off = median_of("eventgate", "history0-fanout-1x1000", key)
        on = median_of("eventgate", "history1000-fanout-1x1000", key)
        ra = ratio(on, off)
        ok = ra is not None and (ra >= 0.95 if higher else ra <= 1.05)
        print(f"| {name} | {fmt(off, '{:.2f}')} | {fmt(on, '{:.2f}')} | {fmt(ra, '{:.3f}×')} | "
              f"within 5%: {'met' if ok else ('no data' if ra is None else 'missed')} |")
