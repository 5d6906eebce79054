//! Log output shared by the daemons and the client: human-readable text,
//! or one JSON object per line (`log_format = "json"`, `-o log_format=json`)
//! for log collectors.

use crate::request_id;
use serde::{Deserialize, Serialize};
use std::fmt;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
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
    use tracing_subscriber::util::SubscriberInitExt;
    subscriber(filter, format, ansi, target, writer).init()
}

/// The subscriber [`init`] installs.
fn subscriber<W>(
    filter: EnvFilter,
    format: LogFormat,
    ansi: bool,
    target: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_writer(writer);
    let line = Format::default().with_target(target);
    match format {
        LogFormat::Text => Box::new(
            b.with_ansi(ansi)
                .event_format(WithRequestId {
                    inner: line.with_ansi(ansi),
                    format,
                })
                .finish(),
        ),
        // The current span carries the request id; the list of all
        // enclosing spans would only repeat it.
        LogFormat::Json => Box::new(
            b.fmt_fields(JsonFields::new())
                .event_format(WithRequestId {
                    inner: line.json().with_current_span(true).with_span_list(false),
                    format,
                })
                .finish(),
        ),
    }
}

/// Adds the request id to the lines of work that runs inside
/// [`request_id::scope`] but in no span: the client's operations and the
/// daemons' own jobs (a GC pass, a Raft call), which carry an id to the
/// daemons they call without paying for a span each. The line looks as
/// if it were inside the servers' `req` span: `req{rid=…}: ` in text,
/// `"span":{"rid":…,"name":"req"}` in JSON. Only lines that are written
/// pay anything.
struct WithRequestId<F> {
    inner: F,
    format: LogFormat,
}

impl<S, N, F> FormatEvent<S, N> for WithRequestId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let id = match request_id::current() {
            // Inside a span the servers' `req` span already shows it.
            Some(id) if ctx.lookup_current().is_none() => request_id::Id(id),
            _ => return self.inner.format_event(ctx, writer, event),
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&with_id(&line, id, self.format))
    }
}

/// `line` (one formatted event, as [`init`]'s formats write it without
/// colours) with request `id` put where a span would show it.
fn with_id(line: &str, id: request_id::Id, format: LogFormat) -> String {
    let at = match format {
        // `{"timestamp":…`: the span first.
        LogFormat::Json => line.find('{').map(|i| {
            (
                i + 1,
                format!("\"span\":{{\"rid\":\"{id}\",\"name\":\"req\"}},"),
            )
        }),
        // `TIMESTAMP LEVEL message`, the level padded to 5: after it.
        LogFormat::Text => line
            .find(' ')
            .map(|i| i + 7)
            .filter(|&i| line.get(i - 1..i) == Some(" "))
            .map(|i| (i, format!("req{{rid={id}}}: "))),
    };
    match at {
        Some((i, tag)) => {
            let mut s = String::with_capacity(line.len() + tag.len());
            s.push_str(&line[..i]);
            s.push_str(&tag);
            s.push_str(&line[i..]);
            s
        }
        // Not the shape expected: the id goes at the end, the line stays.
        None => format!("{} rid={id}\n", line.trim_end()),
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

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buf {
        type Writer = Buf;
        fn make_writer(&'w self) -> Buf {
            self.clone()
        }
    }

    /// The lines logged in `format` by: an event outside any request, one
    /// inside request `id` without a span (a client operation), and one
    /// inside a server's `req` span for `id`.
    fn logged(format: LogFormat, id: u64) -> Vec<String> {
        let buf = Buf::default();
        let sub = subscriber(EnvFilter::new("info"), format, false, false, buf.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::info!(n = 1, "outside");
            futures::executor::block_on(request_id::scope(id, async {
                tracing::warn!(n = 2, "in a scope");
            }));
            futures::executor::block_on(request_id::serve(id, "op", async {
                tracing::info!(n = 3, "in a span");
            }));
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn text_lines_of_a_request_show_its_id_once() {
        let lines = logged(LogFormat::Text, 0xab);
        let tag = "req{rid=00000000000000ab}: ";
        assert!(!lines[0].contains("rid"), "{}", lines[0]);
        assert!(
            lines[1].contains(&format!("WARN {tag}in a scope n=2")),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains(&format!("INFO {tag}in a span n=3")),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn json_lines_of_a_request_carry_its_id_in_the_span() {
        let lines = logged(LogFormat::Json, 0xab);
        let v: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert!(v[0].get("span").is_none(), "{}", lines[0]);
        for (v, n) in v[1..3].iter().zip([2, 3]) {
            assert_eq!(v["span"]["rid"], "00000000000000ab", "{v}");
            assert_eq!(v["span"]["name"], "req", "{v}");
            assert_eq!(v["fields"]["n"], n, "{v}");
        }
    }
}
