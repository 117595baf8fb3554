//! What every server's human and scraper pages share: HTML escaping for the status pages and
//! the Prometheus `/metrics` reply (OpenMetrics text from a `prometheus-client` registry).

use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::borrow::Cow;

/// `text` made safe anywhere in an HTML page, element content or quoted attribute: `&`, `<`,
/// `>`, `"` and `'` become entities.
pub fn escape(text: &str) -> Cow<'_, str> {
    html_escape::encode_quoted_attribute(text)
}

/// The content type of `Metrics::response`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One scrape's metrics, each with its value now, encoded as OpenMetrics text.
///
/// Names are written as given, except a counter's, which the format spells `NAME_total`:
/// `counter("x", …)` is exposed as `x_total`. Help texts are given without the final full
/// stop, which the encoder adds.
#[derive(Debug, Default)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// A value that goes up and down (or is simply "now").
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.registry.register(name, help, ConstGauge::new(value));
        self
    }

    /// A fractional gauge (seconds, ratios).
    pub fn gauge_f64(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.registry.register(name, help, ConstGauge::new(value));
        self
    }

    /// A count that only goes up, exposed as `NAME_total`.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.registry.register(name, help, ConstCounter::new(value));
        self
    }

    /// A count whose name has no `_total` (so it is kept as it was first exposed), typed
    /// `unknown` as it was before it had a type.
    pub fn untyped(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.registry.register(name, help, Untyped(value));
        self
    }

    /// A gauge per value of one label, e.g. `machines{status="synced"} 3`, in the given order.
    pub fn gauge_by(
        &mut self,
        name: &str,
        help: &str,
        label: &'static str,
        values: impl IntoIterator<Item = (String, u64)>,
    ) -> &mut Self {
        let family = GaugeFamily {
            label,
            values: values.into_iter().collect(),
        };
        self.registry.register(name, help, family);
        self
    }

    /// The OpenMetrics text of every metric, ending in `# EOF`.
    pub fn text(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }

    /// The `/metrics` reply.
    pub fn response(&self) -> Response {
        (
            [(axum::http::header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            self.text(),
        )
            .into_response()
    }
}

/// A metric of type `unknown` (untyped).
#[derive(Debug)]
struct Untyped(u64);

impl EncodeMetric for Untyped {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Unknown
    }
}

/// Gauges told apart by one label, encoded in the order given.
#[derive(Debug)]
struct GaugeFamily {
    label: &'static str,
    values: Vec<(String, u64)>,
}

impl EncodeMetric for GaugeFamily {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (value, n) in &self.values {
            let labels = [(self.label, value.as_str())];
            encoder.encode_family(&labels)?.encode_gauge(n)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_every_html_special_character() {
        assert_eq!(
            escape(r#"<script>"a" & 'b'</script>"#),
            "&lt;script&gt;&quot;a&quot; &amp; &#x27;b&#x27;&lt;/script&gt;"
        );
        assert!(matches!(escape("plain/text"), Cow::Borrowed(_)));
    }

    #[test]
    fn metric_names_are_kept_and_counters_get_total() {
        let mut m = Metrics::new();
        m.gauge("x_images", "Images", 3)
            .gauge_f64("x_seconds", "Seconds", 0.25)
            .counter("x_added", "Added", 7)
            .untyped("x_scan_count", "Scans", 5)
            .gauge_by(
                "x_machines",
                "Machines",
                "status",
                [("synced".to_string(), 2), ("fetching".to_string(), 1)],
            );
        let t = m.text();
        for want in [
            "# HELP x_images Images.\n# TYPE x_images gauge\nx_images 3\n",
            "x_seconds 0.25\n",
            "# TYPE x_added counter\nx_added_total 7\n",
            "# TYPE x_scan_count unknown\nx_scan_count 5\n",
            "x_machines{status=\"synced\"} 2\nx_machines{status=\"fetching\"} 1\n",
        ] {
            assert!(t.contains(want), "{want:?} not in\n{t}");
        }
        assert!(t.ends_with("# EOF\n"), "{t}");
    }
}
