//! `avalonctl top`: a live terminal view of operations per second, mean
//! latency and throughput per daemon and per client mount, and the slowest
//! OSDs. Once a second it reads the cluster status (the Status RPC, as
//! `avalonctl status`), whose rows carry each process's totals since start,
//! and shows the rates between two readings. `q` (or Esc, Ctrl-C) quits.

use avalon_proto::cluster_status::{self, human, ClusterStatus, Totals};
use avalon_proto::tls::ClientTls;
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use ratatui::{DefaultTerminal, Frame};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often the view refreshes.
const EVERY: Duration = Duration::from_secs(1);
/// How many OSDs the "slowest" table lists.
const SLOWEST: usize = 5;

/// One process's rates over the last interval.
#[derive(Debug, Clone, PartialEq)]
pub struct RateRow {
    pub name: String,
    pub state: String,
    pub ops: f64,
    /// Mean latency of those operations (ms; 0 without any).
    pub ms: f64,
    pub read_bps: f64,
    pub write_bps: f64,
}

/// Rates of every process between two status readings.
#[derive(Debug, Default)]
pub struct Rates {
    pub mds: Vec<RateRow>,
    pub osds: Vec<RateRow>,
    pub clients: Vec<RateRow>,
}

impl Rates {
    /// Rates from `prev` to `cur`, `secs` apart. A process missing from
    /// `prev` (or restarted: its totals went back) shows zero.
    pub fn between(prev: &ClusterStatus, cur: &ClusterStatus, secs: f64) -> Rates {
        let before = |v: Vec<(u64, Totals)>| v.into_iter().collect::<HashMap<u64, Totals>>();
        let mds0 = before(prev.mds.iter().map(|m| (m.id, m.totals)).collect());
        let osd0 = before(prev.osds.iter().map(|o| (o.id, o.totals)).collect());
        let cl0 = before(
            prev.clients
                .iter()
                .map(|c| (c.session_id, c.totals))
                .collect(),
        );
        Rates {
            mds: cur
                .mds
                .iter()
                .map(|m| {
                    rate(
                        format!("mds.{}", m.id),
                        &m.role,
                        &m.totals,
                        mds0.get(&m.id),
                        secs,
                    )
                })
                .collect(),
            osds: cur
                .osds
                .iter()
                .map(|o| {
                    rate(
                        format!("osd.{}", o.id),
                        &o.state,
                        &o.totals,
                        osd0.get(&o.id),
                        secs,
                    )
                })
                .collect(),
            clients: cur
                .clients
                .iter()
                .map(|c| {
                    rate(
                        format!("{} {}:{}", c.session_id, c.hostname, c.mountpoint),
                        "",
                        &c.totals,
                        cl0.get(&c.session_id),
                        secs,
                    )
                })
                .collect(),
        }
    }

    /// The OSDs with operations, slowest mean latency first.
    pub fn slowest_osds(&self) -> Vec<&RateRow> {
        let mut v: Vec<&RateRow> = self.osds.iter().filter(|r| r.ops > 0.0).collect();
        v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        v.truncate(SLOWEST);
        v
    }
}

fn rate(name: String, state: &str, cur: &Totals, prev: Option<&Totals>, secs: f64) -> RateRow {
    let zero = RateRow {
        name: name.clone(),
        state: state.to_string(),
        ops: 0.0,
        ms: 0.0,
        read_bps: 0.0,
        write_bps: 0.0,
    };
    let Some(p) = prev else { return zero };
    if cur.ops < p.ops || secs <= 0.0 {
        return zero;
    }
    let ops = cur.ops - p.ops;
    RateRow {
        ops: ops as f64 / secs,
        ms: if ops == 0 {
            0.0
        } else {
            cur.op_micros.saturating_sub(p.op_micros) as f64 / ops as f64 / 1000.0
        },
        read_bps: cur.read_bytes.saturating_sub(p.read_bytes) as f64 / secs,
        write_bps: cur.written_bytes.saturating_sub(p.written_bytes) as f64 / secs,
        ..zero
    }
}

/// Runs the view until `q`; the terminal is restored on every way out.
pub fn run(tls: ClientTls, addrs: Vec<String>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut term = ratatui::init();
    let res = view(&mut term, &rt, &tls, &addrs);
    ratatui::restore();
    res
}

fn view(
    term: &mut DefaultTerminal,
    rt: &tokio::runtime::Runtime,
    tls: &ClientTls,
    addrs: &[String],
) -> anyhow::Result<()> {
    let mut prev: Option<(Instant, ClusterStatus)> = None;
    loop {
        let st = rt.block_on(cluster_status::collect(tls, addrs, Duration::from_secs(2)));
        let now = Instant::now();
        let rates = prev
            .as_ref()
            .map(|(t, p)| Rates::between(p, &st, now.duration_since(*t).as_secs_f64()));
        term.draw(|f| draw(f, &st, rates.as_ref()))?;
        prev = Some((now, st));
        let next = now + EVERY;
        while let Some(left) = next.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            if let Event::Key(k) = event::read()? {
                let ctrl_c =
                    k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if k.kind == KeyEventKind::Press
                    && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                {
                    return Ok(());
                }
            }
        }
    }
}

fn bps(v: f64) -> String {
    format!("{}/s", human(v as u64))
}

fn cells(r: &RateRow) -> Row<'static> {
    Row::new(vec![
        r.name.clone(),
        r.state.clone(),
        format!("{:.1}", r.ops),
        format!("{:.2}", r.ms),
        bps(r.read_bps),
        bps(r.write_bps),
    ])
}

fn table<'a>(title: &'a str, first: &'a str, rows: Vec<Row<'a>>) -> Table<'a> {
    let head = Row::new(vec![first, "state", "ops/s", "lat ms", "read", "write"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    Table::new(
        rows,
        [
            Constraint::Min(20),
            Constraint::Length(12),
            Constraint::Length(10),
            Constraint::Length(9),
            Constraint::Length(13),
            Constraint::Length(13),
        ],
    )
    .header(head)
    .block(Block::default().borders(Borders::ALL).title(title))
}

fn draw(f: &mut Frame, st: &ClusterStatus, rates: Option<&Rates>) {
    let empty = Rates::default();
    let r = rates.unwrap_or(&empty);
    let sum = |v: &[RateRow], g: fn(&RateRow) -> f64| v.iter().map(g).sum::<f64>();
    let up = st.osds.iter().filter(|o| o.state == "up").count();
    let header = vec![
        Line::from(format!(
            "avalon top  {}  leader {}  OSDs {up}/{} up  clients {}  (q quits)",
            st.health,
            st.leader_id
                .map_or("none".to_string(), |i| format!("mds.{i}")),
            st.osds.len(),
            st.clients.len()
        )),
        Line::from(match rates {
            None => "measuring ...".to_string(),
            Some(_) => format!(
                "ops/s: mds {:.1}  osd {:.1}  clients {:.1}   data: read {}  write {}",
                sum(&r.mds, |x| x.ops),
                sum(&r.osds, |x| x.ops),
                sum(&r.clients, |x| x.ops),
                bps(sum(&r.osds, |x| x.read_bps)),
                bps(sum(&r.osds, |x| x.write_bps)),
            ),
        }),
    ];
    let daemons = r.mds.len() + r.osds.len();
    let areas = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(daemons as u16 + 3),
        Constraint::Length(r.clients.len() as u16 + 3),
        Constraint::Min(4),
    ])
    .split(f.area());
    f.render_widget(Paragraph::new(header), areas[0]);
    let rows = r.mds.iter().chain(&r.osds).map(cells).collect();
    f.render_widget(table("daemons", "daemon", rows), areas[1]);
    let rows = r.clients.iter().map(cells).collect();
    f.render_widget(table("clients", "session host:mount", rows), areas[2]);
    let rows = r.slowest_osds().into_iter().map(cells).collect();
    f.render_widget(table("slowest OSDs", "osd", rows), areas[3]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use avalon_proto::cluster_status::{ClientRow, MdsRow};

    fn mds(ops: u64, micros: u64) -> MdsRow {
        MdsRow {
            id: 1,
            addr: String::new(),
            pid: 0,
            role: "leader".into(),
            term: 1,
            last_applied: 0,
            leader_id: 1,
            disk_total_bytes: 0,
            disk_free_bytes: 0,
            disk_low: false,
            metrics_addr: String::new(),
            totals: Totals {
                ops,
                op_micros: micros,
                ..Default::default()
            },
            version: String::new(),
        }
    }

    #[test]
    fn rates_come_from_deltas() {
        let a = ClusterStatus {
            mds: vec![mds(100, 1_000)],
            ..Default::default()
        };
        let b = ClusterStatus {
            mds: vec![mds(300, 401_000)],
            clients: vec![ClientRow {
                session_id: 9,
                hostname: "h".into(),
                mountpoint: "/m".into(),
                pid: 1,
                last_seen_ms: 0,
                totals: Totals {
                    ops: 5,
                    ..Default::default()
                },
                version: String::new(),
            }],
            ..Default::default()
        };
        let r = Rates::between(&a, &b, 2.0);
        assert_eq!(r.mds[0].ops, 100.0);
        assert_eq!(r.mds[0].ms, 2.0);
        // A client new since the last reading shows nothing yet.
        assert_eq!(r.clients[0].ops, 0.0);
        // A restart (totals back to fewer) is not a negative rate.
        let r = Rates::between(&b, &a, 1.0);
        assert_eq!(r.mds[0].ops, 0.0);
    }
}
