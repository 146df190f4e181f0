//! Logging: env_logger's output behind a filter that a reload (SIGHUP) can
//! replace. env_logger fixes its filter when it is built, and
//! `log::set_max_level` alone can only lower what that filter lets through,
//! so a reload builds a new logger and swaps it in.

use std::sync::OnceLock;

use parking_lot::RwLock;

/// The installed logger and the filter it was built with.
struct Reloadable {
    logger: RwLock<(env_logger::Logger, String)>,
}

static LOGGER: OnceLock<Reloadable> = OnceLock::new();

/// The filter in force: `RUST_LOG` when set, else the settings' `log.level`.
fn filter_of(level: &str) -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string())
}

fn build(filter: &str) -> env_logger::Logger {
    // The filter's most verbose level, which the connector's rule must not raise.
    let most = env_logger::Builder::new()
        .parse_filters(filter)
        .build()
        .filter();
    let mut builder = env_logger::Builder::new();
    // The NATS client's connector prints its connect options, the URL's
    // password included, at debug: kept at info at most unless named in the
    // filter (a filter's own `async_nats::connector=…` replaces this one).
    builder.filter_module("async_nats::connector", most.min(log::LevelFilter::Info));
    builder.parse_filters(filter);
    // The journal stamps each line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format_timestamp(None);
    }
    builder.build()
}

impl log::Log for Reloadable {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.logger.read().0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        self.logger.read().0.log(record);
    }

    fn flush(&self) {
        self.logger.read().0.flush();
    }
}

/// Installs the process's logger with the settings' `log.level` (or `RUST_LOG`).
pub fn init(level: &str) {
    let filter = filter_of(level);
    let logger = build(&filter);
    let max = logger.filter();
    let installed = LOGGER.get_or_init(|| Reloadable {
        logger: RwLock::new((logger, filter)),
    });
    if log::set_logger(installed).is_ok() {
        log::set_max_level(max);
    }
}

/// Replaces the filter with the settings' new `log.level` (unless `RUST_LOG`
/// decides); returns the new filter when it changed.
pub fn reload(level: &str) -> Option<String> {
    let installed = LOGGER.get()?;
    let filter = filter_of(level);
    let mut held = installed.logger.write();
    if held.1 == filter {
        return None;
    }
    let logger = build(&filter);
    log::set_max_level(logger.filter());
    *held = (logger, filter.clone());
    Some(filter)
}
