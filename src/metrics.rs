//! Prometheus metrics: one registry per server, rendered by `GET /metrics`.
//! Owns the metric definitions only; the code that observes things holds a
//! `Metrics` handle and bumps them.

use crate::ws::close::CloseCode;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Most instances reported by name in the per-instance gauge; the rest are
/// summed under `instance="_other"` so cardinality stays bounded.
pub const MAX_INSTANCE_LABELS: usize = 100;

/// Every metric eventgate exports.
pub struct Metrics {
    registry: Registry,
    pub connected_clients: IntGauge,
    pub connected_by_instance: IntGaugeVec,
    pub instance_actors: IntGauge,
    pub upgrades: IntCounterVec,
    pub events_published: IntCounter,
    pub events_delivered: IntCounter,
    pub clients_evicted: IntCounterVec,
    pub disconnects: IntCounterVec,
    pub fanout_seconds: Histogram,
    pub http_requests: IntCounterVec,
    pub rate_limited: IntCounter,
    pub bus_errors: IntCounterVec,
    pub publish_waits: IntCounter,
    pub publish_lag: IntCounter,
    pub direct_writes: IntCounterVec,
    // Webhooks (contract §11).
    pub webhook_deliveries: IntCounterVec,
    pub webhook_pending: IntGauge,
    pub webhook_delivery_seconds: Histogram,
    /// This node's clock minus PostgreSQL's (`storage::clock`).
    pub clock_offset: Gauge,
    /// Recovery on reconnect (contract §12): attempts by outcome, events replayed.
    pub recoveries: IntCounterVec,
    pub replayed_events: IntCounter,
}

impl Metrics {
    /// Builds and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let connected_clients = IntGauge::new(
            "eventgate_connected_clients",
            "WebSocket clients connected to this node",
        )?;
        let connected_by_instance = IntGaugeVec::new(
            Opts::new(
                "eventgate_instance_connected_clients",
                "WebSocket clients connected to this node, per instance (bounded; the rest under _other)",
            ),
            &["instance"],
        )?;
        let instance_actors = IntGauge::new(
            "eventgate_instance_actors",
            "Instance actors running on this node (started by a client, or by a publish when a history is kept; stopped when the instance is deleted)",
        )?;
        let upgrades = IntCounterVec::new(
            Opts::new(
                "eventgate_ws_upgrades_total",
                "WebSocket upgrade attempts by result (accepted, or the refusal reason)",
            ),
            &["result"],
        )?;
        let events_published = IntCounter::new(
            "eventgate_events_published_total",
            "Events accepted by the publish endpoint",
        )?;
        let events_delivered = IntCounter::new(
            "eventgate_events_delivered_total",
            "Envelopes queued to WebSocket clients",
        )?;
        let clients_evicted = IntCounterVec::new(
            Opts::new(
                "eventgate_clients_evicted_total",
                "Clients closed by the server, by reason (slow_consumer, heartbeat)",
            ),
            &["reason"],
        )?;
        let disconnects = IntCounterVec::new(
            Opts::new(
                "eventgate_client_disconnects_total",
                "WebSocket sessions ended, by close reason",
            ),
            &["reason"],
        )?;
        let fanout_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "eventgate_fanout_seconds",
                "Time from a publish being accepted to its events being queued to every client",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1.0,
            ]),
        )?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "eventgate_http_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )?;
        let rate_limited = IntCounter::new(
            "eventgate_rate_limited_total",
            "Requests refused with 429 by the rate limiter",
        )?;
        let bus_errors = IntCounterVec::new(
            Opts::new(
                "eventgate_bus_errors_total",
                "Messages that could not cross to other nodes, by kind",
            ),
            &["kind"],
        )?;
        let publish_waits = IntCounter::new(
            "eventgate_publish_waits_total",
            "Publishes answered only once fanned out: their instance had limits.publish_lag or limits.publish_queue publishes waiting for its fan-out, or its sessions were behind on this node",
        )?;
        let publish_lag = IntCounter::new(
            "eventgate_publish_lag_total",
            "Times an instance's sessions fell behind on this node, so that its publishers waited for them to catch up",
        )?;
        let direct_writes = IntCounterVec::new(
            Opts::new(
                "eventgate_direct_writes_total",
                "Batches the fan-out wrote to an idle client's socket itself, by whether the socket took them whole or in part (the rest then went through the session)",
            ),
            &["written"],
        )?;
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "eventgate_webhook_deliveries_total",
                "Webhook attempts that succeeded or failed, and deliveries that became dead letters",
            ),
            &["outcome"],
        )?;
        let webhook_pending = IntGauge::new(
            "eventgate_webhook_pending",
            "Webhook deliveries not yet succeeded nor dead letters (the cluster's)",
        )?;
        let webhook_delivery_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "eventgate_webhook_delivery_seconds",
                "Time from a publish being accepted to its webhook delivery succeeding",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                1800.0, 7200.0, 36000.0, 100000.0,
            ]),
        )?;
        for outcome in ["success", "failure", "dead_letter"] {
            webhook_deliveries.with_label_values(&[outcome]);
        }
        registry.register(Box::new(webhook_deliveries.clone()))?;
        registry.register(Box::new(webhook_pending.clone()))?;
        registry.register(Box::new(webhook_delivery_seconds.clone()))?;
        let clock_offset = Gauge::new(
            "eventgate_clock_offset_seconds",
            "This node's clock minus PostgreSQL's, read every 5 s (webhook leases compare \
             node clocks); NaN until read, and on SQLite",
        )?;
        clock_offset.set(f64::NAN);
        registry.register(Box::new(clock_offset.clone()))?;
        let recoveries = IntCounterVec::new(
            Opts::new(
                "eventgate_recoveries_total",
                "Reconnects that asked to recover (with since), by outcome",
            ),
            &["recovered"],
        )?;
        let replayed_events = IntCounter::new(
            "eventgate_replayed_events_total",
            "Envelopes replayed to recovering clients",
        )?;
        registry.register(Box::new(recoveries.clone()))?;
        registry.register(Box::new(replayed_events.clone()))?;
        registry.register(Box::new(connected_clients.clone()))?;
        registry.register(Box::new(instance_actors.clone()))?;
        registry.register(Box::new(connected_by_instance.clone()))?;
        registry.register(Box::new(upgrades.clone()))?;
        registry.register(Box::new(events_published.clone()))?;
        registry.register(Box::new(events_delivered.clone()))?;
        registry.register(Box::new(clients_evicted.clone()))?;
        registry.register(Box::new(disconnects.clone()))?;
        registry.register(Box::new(fanout_seconds.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(bus_errors.clone()))?;
        registry.register(Box::new(publish_waits.clone()))?;
        registry.register(Box::new(publish_lag.clone()))?;
        registry.register(Box::new(direct_writes.clone()))?;
        // Labelled families show in /metrics only once they have a series:
        // the expected ones start at 0, so dashboards and alerts see every
        // family from the first scrape (config/grafana-dashboard.json,
        // checked by .ci/check-dashboard).
        for reason in [CloseCode::SlowConsumer, CloseCode::HeartbeatTimeout] {
            clients_evicted.with_label_values(&[reason.label()]);
        }
        disconnects.with_label_values(&[CloseCode::Normal.label()]);
        upgrades.with_label_values(&["accepted"]);
        for recovered in ["true", "false"] {
            recoveries.with_label_values(&[recovered]);
        }
        for written in ["whole", "partly"] {
            direct_writes.with_label_values(&[written]);
        }
        Ok(Self {
            registry,
            connected_clients,
            instance_actors,
            connected_by_instance,
            upgrades,
            events_published,
            events_delivered,
            clients_evicted,
            disconnects,
            fanout_seconds,
            http_requests,
            rate_limited,
            bus_errors,
            publish_waits,
            publish_lag,
            direct_writes,
            webhook_deliveries,
            webhook_pending,
            webhook_delivery_seconds,
            clock_offset,
            recoveries,
            replayed_events,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_labelled_families_show_before_their_first_sample() {
        let text = Metrics::new().and_then(|m| m.render()).unwrap_or_default();
        for series in [
            "eventgate_clients_evicted_total{reason=\"slow_consumer\"} 0",
            "eventgate_clients_evicted_total{reason=\"heartbeat\"} 0",
            "eventgate_client_disconnects_total{reason=\"normal\"} 0",
            "eventgate_ws_upgrades_total{result=\"accepted\"} 0",
            "eventgate_recoveries_total{recovered=\"true\"} 0",
            "eventgate_recoveries_total{recovered=\"false\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }
}
