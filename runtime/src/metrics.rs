//! One declaration per metric: [`metrics!`](crate::metrics!) writes a daemon's metrics struct, its
//! registry (every metric registered under its name and help text, with the daemon's prefix) and
//! its text exposition, so a metric is never listed once as a field, once as a default and once as
//! a registration.

#[doc(hidden)]
pub use prometheus_client;

/// Declares a metrics struct:
///
/// ```ignore
/// farm_runtime::metrics! {
///     /// The node's metrics.
///     pub struct Metrics, prefix "farm_node" {
///         /// Viewer requests by kind.
///         pub requests: Family<KindLabel, Counter> => ("requests", "Viewer requests by kind"),
///         pub tick: Histogram = Histogram::new([0.1, 1.0]) => ("tick_seconds", "One tick"),
///     }
/// }
/// ```
///
/// A metric without `= init` starts from its `Default`. The struct gets `registered()` (every
/// metric registered) and `render()` (the text exposition; empty if encoding fails).
#[macro_export]
macro_rules! metrics {
    (
        $(#[$smeta:meta])*
        $vis:vis struct $name:ident, prefix $prefix:literal {
            $(
                $(#[$fmeta:meta])*
                $fvis:vis $field:ident : $ty:ty $(= $init:expr)? => ($metric:literal, $help:expr $(,)?)
            ),* $(,)?
        }
    ) => {
        $(#[$smeta])*
        $vis struct $name {
            registry: $crate::metrics::prometheus_client::registry::Registry,
            $( $(#[$fmeta])* $fvis $field: $ty, )*
        }

        impl $name {
            /// Every metric, registered under the daemon's prefix.
            fn registered() -> Self {
                let mut registry =
                    $crate::metrics::prometheus_client::registry::Registry::with_prefix($prefix);
                $( let $field: $ty = $crate::__metric_init!($($init)?); )*
                $( registry.register($metric, $help, $field.clone()); )*
                Self { registry, $($field,)* }
            }

            /// The Prometheus text exposition of every metric (empty if encoding fails).
            pub fn render(&self) -> String {
                let mut out = String::new();
                if $crate::metrics::prometheus_client::encoding::text::encode(&mut out, &self.registry)
                    .is_err()
                {
                    out.clear();
                }
                out
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __metric_init {
    () => {
        ::core::default::Default::default()
    };
    ($init:expr) => {
        $init
    };
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;

    crate::metrics! {
        struct Sample, prefix "farm_test" {
            /// A counter.
            pub hits: Counter => ("hits", "Hits counted"),
            pub took: Histogram = Histogram::new([0.5, 1.0]) => ("took_seconds", "Time taken"),
        }
    }

    #[test]
    fn every_declared_metric_is_registered_under_its_name_and_prefix() {
        let m = Sample::registered();
        m.hits.inc();
        m.took.observe(0.7);
        let text = m.render();
        assert!(
            text.contains("# HELP farm_test_hits Hits counted."),
            "{text}"
        );
        assert!(text.contains("farm_test_hits_total 1"), "{text}");
        assert!(text.contains("farm_test_took_seconds_count 1"), "{text}");
    }
}
