//! Log output shared by the daemons and the client: human-readable text,
//! or one JSON object per line (`log_format = "json"`, `-o log_format=json`)
//! for log collectors.

use serde::{Deserialize, Serialize};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, fields, and the span
    /// the event happened in (with its request id).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format {s:?} (text or json)")),
        }
    }
}

/// Installs the global subscriber: `filter`, `format`, colours if `ansi`
/// (text only), event targets if `target`, lines to `writer`. A logger
/// that cannot write does not report it on stderr (that `eprintln!`
/// panics when stderr is a pipe nobody reads any more).
pub fn init<W>(filter: EnvFilter, format: LogFormat, ansi: bool, target: bool, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(target)
        .log_internal_errors(false)
        .with_writer(writer);
    match format {
        LogFormat::Text => b.with_ansi(ansi).init(),
        // The current span carries the request id; the list of all
        // enclosing spans would only repeat it.
        LogFormat::Json => b
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_formats() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
