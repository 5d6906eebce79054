//! The status page (issue 22): HTML that every MDS serves on its metrics
//! listener (`/` and `/status`), rendered on the server from the same
//! [`cluster_status::collect`] as `avalonctl status --json`, with small
//! inline SVG charts of recent throughput and latency from a ring buffer of
//! samples this node takes. No script: a meta refresh reloads it. A
//! follower redirects to the leader's page (only the leader hears the OSDs'
//! and clients' heartbeats, so only its charts have their figures); it
//! renders its own when the leader has no reachable page.

use crate::node::MdsNode;
use avalon_proto::cluster_status::{self, human, ClusterStatus, OsdRow};
use avalon_proto::pb::OpTotals;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use std::collections::{HashMap, VecDeque};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a sample is taken, and how many are kept (10 minutes).
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const SAMPLES: usize = 300;
/// The page reloads itself this often.
const REFRESH_SECS: u32 = 5;
/// How long the page waits for each MDS's status.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Rates over one sampling interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Metadata operations per second on this MDS, and their mean latency (ms).
    pub meta_ops: f64,
    pub meta_ms: f64,
    /// Data bytes per second the OSDs read and wrote as primaries.
    pub read_bps: f64,
    pub write_bps: f64,
    /// The OSDs' mean operation latency (ms).
    pub osd_ms: f64,
}

/// The ring buffer of recent samples, oldest first.
#[derive(Default)]
pub struct Samples {
    ring: Mutex<VecDeque<Sample>>,
}

impl Samples {
    fn push(&self, s: Sample) {
        let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() == SAMPLES {
            r.pop_front();
        }
        r.push_back(s);
    }

    fn snapshot(&self) -> Vec<Sample> {
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        r.iter().copied().collect()
    }
}

/// The page's routes; starts the sampler, which ends with the node.
pub fn router(node: Arc<MdsNode>) -> Router {
    let samples = Arc::new(Samples::default());
    tokio::spawn(sample_loop(node.clone(), samples.clone()));
    let handler = move || {
        let (node, samples) = (node.clone(), samples.clone());
        async move { page(&node, &samples).await }
    };
    Router::new()
        .route("/", get(handler.clone()))
        .route("/status", get(handler))
}

async fn page(node: &MdsNode, samples: &Samples) -> Response {
    let st =
        cluster_status::collect(&node.tls, std::slice::from_ref(&node.addr), ASK_TIMEOUT).await;
    if let Some(url) = leader_page(node.id, &st) {
        return Redirect::temporary(&url).into_response();
    }
    let own = node.metrics_addr.get().map(String::as_str).unwrap_or("");
    Html(render(&st, node.id, own, &samples.snapshot())).into_response()
}

/// The leader's page, if another node leads and serves one at an address
/// a browser can use (not a wildcard).
fn leader_page(me: u64, st: &ClusterStatus) -> Option<String> {
    let leader = st.mds.iter().find(|m| m.role == "leader")?;
    let addr: SocketAddr = leader.metrics_addr.parse().ok()?;
    (leader.id != me && !addr.ip().is_unspecified()).then(|| format!("http://{addr}/status"))
}

/// `a - b` per counter; a counter that went back (a restart) counts 0.
fn delta(a: &OpTotals, b: &OpTotals) -> OpTotals {
    OpTotals {
        ops: a.ops.saturating_sub(b.ops),
        op_micros: a.op_micros.saturating_sub(b.op_micros),
        read_bytes: a.read_bytes.saturating_sub(b.read_bytes),
        written_bytes: a.written_bytes.saturating_sub(b.written_bytes),
    }
}

fn mean_ms(d: &OpTotals) -> f64 {
    if d.ops == 0 {
        0.0
    } else {
        d.op_micros as f64 / d.ops as f64 / 1000.0
    }
}

/// Takes a sample every [`SAMPLE_EVERY`]: this node's metadata operations
/// and the OSD totals from the reports it holds (the leader's), as rates.
async fn sample_loop(node: Arc<MdsNode>, samples: Arc<Samples>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut prev: Option<(Instant, OpTotals, HashMap<u64, OpTotals>)> = None;
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let meta = crate::metrics::totals().unwrap_or_default();
        let osds: HashMap<u64, OpTotals> = node.osd_totals().into_iter().collect();
        if let Some((t0, meta0, osds0)) = &prev {
            let secs = now.duration_since(*t0).as_secs_f64().max(1e-3);
            let dm = delta(&meta, meta0);
            let mut d = OpTotals::default();
            for (id, t) in &osds {
                // An OSD new since the last sample starts counting now.
                let x = delta(t, osds0.get(id).unwrap_or(t));
                d.ops += x.ops;
                d.op_micros += x.op_micros;
                d.read_bytes += x.read_bytes;
                d.written_bytes += x.written_bytes;
            }
            samples.push(Sample {
                meta_ops: dm.ops as f64 / secs,
                meta_ms: mean_ms(&dm),
                read_bps: d.read_bytes as f64 / secs,
                write_bps: d.written_bytes as f64 / secs,
                osd_ms: mean_ms(&d),
            });
        }
        prev = Some((now, meta, osds));
    }
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.2em 0 .4em}\
table{border-collapse:collapse;font-size:.9em;background:#fff}\
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}th{background:#eee}\
td.n{text-align:right}.health{font-size:1.2em;font-weight:bold;padding:.3em .6em;display:inline-block}\
.ok{background:#cfc}.warn{background:#ffd27f}.err{background:#f99}\
.up{color:#070}.down{color:#b00;font-weight:bold}\
.bar{display:inline-block;width:6em;height:.7em;background:#ddd;vertical-align:middle}\
.bar i{display:block;height:100%;background:#48c}\
.charts{display:flex;gap:1em;flex-wrap:wrap}.chart{background:#fff;border:1px solid #ddd;padding:.4em}\
.chart div{font-size:.85em}.muted{color:#777;font-size:.85em}";

fn bar(ratio: f64) -> String {
    format!(
        "<span class=\"bar\"><i style=\"width:{:.1}%\"></i></span>",
        (ratio.clamp(0.0, 1.0) * 100.0)
    )
}

/// Is the OSD running (heartbeating), whatever its placement state?
fn osd_up(o: &OsdRow) -> bool {
    o.state == "up" || (o.state == "out" && o.admin_out && o.last_seen_ms < 10_000)
}

/// A small line chart of `series` (colour, values oldest first), scaled to
/// their maximum, with the latest value of each in the caption.
fn chart(title: &str, fmt: fn(f64) -> String, series: &[(&str, &str, Vec<f64>)]) -> String {
    const W: f64 = 300.0;
    const H: f64 = 70.0;
    let max = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { (H - 4.0) / max } else { 0.0 };
    let step = W / (SAMPLES - 1) as f64;
    let mut o = format!(
        "<div class=\"chart\"><div><b>{}</b> (max {})</div>\
         <svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\">\
         <rect width=\"{W}\" height=\"{H}\" fill=\"#f4f4f4\"/>",
        esc(title),
        esc(&fmt(max))
    );
    for (colour, _, v) in series {
        let x0 = W - step * (v.len().saturating_sub(1)) as f64;
        let pts: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(i, y)| format!("{:.1},{:.1}", x0 + step * i as f64, H - 2.0 - y * scale))
            .collect();
        let _ = write!(
            o,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>",
            esc(colour),
            pts.join(" ")
        );
    }
    o.push_str("</svg><div>");
    for (colour, name, v) in series {
        let _ = write!(
            o,
            "<span style=\"color:{}\">&#9632;</span> {} {} &nbsp;",
            esc(colour),
            esc(name),
            esc(&fmt(v.last().copied().unwrap_or(0.0)))
        );
    }
    o.push_str("</div></div>");
    o
}

fn per_sec(v: f64) -> String {
    format!("{v:.1}/s")
}

fn bytes_per_sec(v: f64) -> String {
    format!("{}/s", human(v as u64))
}

fn millis(v: f64) -> String {
    format!("{v:.2} ms")
}

/// The whole page for status `st`, as node `me` (serving at `own`) sees it.
pub fn render(st: &ClusterStatus, me: u64, own: &str, samples: &[Sample]) -> String {
    let mut o = String::new();
    let class = match st.health.as_str() {
        "HEALTH_OK" => "ok",
        "HEALTH_WARN" => "warn",
        _ => "err",
    };
    let _ = write!(
        o,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>Avalon: {}</title><style>{STYLE}</style></head><body>\
         <h1>Avalon cluster</h1><p id=\"health\" class=\"health {class}\">{}</p>",
        esc(&st.health),
        esc(&st.health)
    );
    if !st.health_detail.is_empty() {
        o.push_str("<ul id=\"health-detail\">");
        for d in &st.health_detail {
            let _ = write!(o, "<li>{}</li>", esc(d));
        }
        o.push_str("</ul>");
    }
    let up = st.osds.iter().filter(|x| osd_up(x)).count();
    let leader = st
        .leader_id
        .map_or("no leader".to_string(), |id| format!("leader mds.{id}"));
    let _ = write!(
        o,
        "<p id=\"summary\">{}, {up}/{} OSDs up, {} clients, map epoch {}, \
         replicas {} (write quorum {}), {} inodes, \
         <span id=\"trash\">trash: {} entries, {}</span>, \
         <span id=\"snapshots\">snapshots: {} ({} in clones)</span></p>",
        esc(&leader),
        st.osds.len(),
        st.clients.len(),
        st.map_epoch,
        st.replicas,
        st.write_quorum,
        st.inodes,
        st.trash_entries,
        human(st.trash_bytes),
        st.snapshots,
        human(st.clone_bytes)
    );

    // Capacity: the OSDs' disks as they report them.
    let (used, free) = st
        .osds
        .iter()
        .filter(|x| osd_up(x))
        .fold((0u64, 0u64), |(u, f), x| {
            (u + x.disk_used_bytes, f + x.disk_free_bytes)
        });
    let total = used + free;
    let ratio = if total > 0 {
        used as f64 / total as f64
    } else {
        0.0
    };
    let _ = write!(
        o,
        "<h2>Capacity</h2><p id=\"capacity\">{} used of {} ({:.1}%) {} on the up OSDs' disks</p>",
        esc(&human(used)),
        esc(&human(total)),
        ratio * 100.0,
        bar(ratio)
    );

    let col = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let _ = write!(
        o,
        "<h2>Recent activity</h2><div class=\"charts\" id=\"charts\">{}{}{}</div>\
         <p class=\"muted\">one sample every {}s, {} kept; OSD figures as the leader hears them</p>",
        chart(
            "Metadata operations",
            per_sec,
            &[("#48c", "ops", col(|s| s.meta_ops))]
        ),
        chart(
            "Data throughput",
            bytes_per_sec,
            &[
                ("#2a2", "read", col(|s| s.read_bps)),
                ("#c60", "write", col(|s| s.write_bps))
            ]
        ),
        chart(
            "Mean latency",
            millis,
            &[
                ("#48c", "MDS", col(|s| s.meta_ms)),
                ("#c60", "OSD", col(|s| s.osd_ms))
            ]
        ),
        SAMPLE_EVERY.as_secs(),
        samples.len()
    );

    let p = &st.pgs;
    let copies_done = p.pg_copies.saturating_sub(p.recovering);
    let progress = if p.pg_copies > 0 {
        f64::from(copies_done) / f64::from(p.pg_copies)
    } else {
        1.0
    };
    let _ = write!(
        o,
        "<h2>Placement groups</h2><table id=\"pgs\"><tr><th>PGs</th><th>degraded</th>\
         <th>peered copies</th><th>to copy</th><th>reports pending</th><th>state</th></tr>\
         <tr><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{copies_done}/{} {}</td>\
         <td class=\"n\">{} ({} chunks)</td><td class=\"n\">{}</td><td class=\"{}\">{}</td></tr></table>",
        p.pg_count,
        p.degraded,
        p.pg_copies,
        bar(progress),
        esc(&human(p.recovery_bytes)),
        p.recovery_chunks,
        p.stale_reports,
        if p.healthy { "up" } else { "down" },
        if p.healthy {
            "healthy"
        } else if p.recovering > 0 || p.recovery_chunks > 0 {
            "recovering"
        } else {
            "degraded"
        }
    );

    o.push_str(
        "<h2>Metadata servers</h2><table id=\"mds\"><tr><th>id</th><th>address</th>\
         <th>role</th><th>term</th><th>applied index</th><th>pid</th><th>disk free</th>\
         <th>version</th><th>page</th></tr>",
    );
    for m in &st.mds {
        let page = if m.metrics_addr.is_empty() {
            String::new()
        } else {
            let a = esc(&m.metrics_addr);
            format!("<a href=\"http://{a}/status\">{a}</a>")
        };
        let _ = write!(
            o,
            "<tr class=\"mds\" id=\"mds-{}\"><td>mds.{}{}</td><td>{}</td><td class=\"{}\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"version\">{}</td><td>{page}</td></tr>",
            m.id,
            m.id,
            if m.id == me { " (this)" } else { "" },
            esc(&m.addr),
            if m.role == "unreachable" {
                "down"
            } else {
                "up"
            },
            esc(&m.role),
            m.term,
            m.last_applied,
            m.pid,
            esc(&human(m.disk_free_bytes)),
            esc(&m.version)
        );
    }
    o.push_str("</table>");

    o.push_str(
        "<h2>Object storage daemons</h2><table id=\"osds\"><tr><th>id</th><th>address</th>\
         <th>up/down</th><th>in/out</th><th>domain</th><th>capacity</th><th>fill</th>\
         <th>PGs</th><th>peering</th><th>to copy</th><th>scrubbed</th><th>scrub errors</th>\
         <th>seen</th><th>version</th></tr>",
    );
    for d in &st.osds {
        let up = if osd_up(d) { "up" } else { "down" };
        let inout = if d.state == "out" || d.admin_out {
            "out"
        } else {
            "in"
        };
        let fill = if d.disk_fill.is_empty() {
            "-".to_string()
        } else {
            format!(
                "{} {:.1}% {}",
                bar(d.fill_ratio()),
                d.fill_ratio() * 100.0,
                if d.disk_fill == "ok" {
                    String::new()
                } else {
                    esc(&d.disk_fill)
                }
            )
        };
        let _ = write!(
            o,
            "<tr class=\"osd\" id=\"osd-{}\" data-state=\"{up}\"><td>osd.{}</td><td>{}</td>\
             <td class=\"updown {up}\">{up}</td><td>{inout}{}</td><td>{}</td><td class=\"n\">{}</td>\
             <td>{fill}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{} ms</td>\
             <td class=\"version\">{}</td></tr>",
            d.id,
            d.id,
            esc(&d.addr),
            if d.admin_out { " (admin)" } else { "" },
            esc(&d.failure_domain),
            esc(&human(d.capacity_bytes)),
            d.pgs,
            d.pgs_peering,
            esc(&human(d.recovery_bytes)),
            d.scrubbed_chunks,
            d.scrub_errors,
            d.last_seen_ms,
            esc(&d.version)
        );
    }
    o.push_str("</table>");

    o.push_str(
        "<h2>Clients</h2><table id=\"clients\"><tr><th>session</th><th>host</th><th>pid</th>\
         <th>mount point</th><th>operations</th><th>read</th><th>written</th><th>seen</th>\
         <th>version</th></tr>",
    );
    for c in &st.clients {
        let _ = write!(
            o,
            "<tr class=\"client\" id=\"client-{}\"><td class=\"n\">{}</td><td>{}</td>\
             <td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{} ms</td><td class=\"version\">{}</td></tr>",
            c.session_id,
            c.session_id,
            esc(&c.hostname),
            c.pid,
            esc(&c.mountpoint),
            c.totals.ops,
            esc(&human(c.totals.read_bytes)),
            esc(&human(c.totals.written_bytes)),
            c.last_seen_ms,
            esc(&c.version)
        );
    }
    o.push_str("</table>");
    let _ = write!(
        o,
        "<p class=\"muted\">served by mds.{me}{}; the same data as <code>avalonctl status --json</code>; \
         reloads every {REFRESH_SECS}s; <a href=\"/metrics\">metrics</a></p></body></html>",
        if own.is_empty() {
            String::new()
        } else {
            format!(" at {}", esc(own))
        }
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use avalon_proto::cluster_status::{ClientRow, Totals};

    #[test]
    fn escapes_what_it_shows() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        let st = ClusterStatus {
            health: "HEALTH_OK".into(),
            clients: vec![ClientRow {
                session_id: 7,
                hostname: "<script>alert(1)</script>".into(),
                mountpoint: "/mnt/\"x\"".into(),
                pid: 1,
                last_seen_ms: 0,
                totals: Totals::default(),
                version: "2 (0.1.0)".into(),
            }],
            trash_entries: 3,
            trash_bytes: 2048,
            ..Default::default()
        };
        let html = render(&st, 1, "", &[Sample::default(); 3]);
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("/mnt/&quot;x&quot;"));
        assert!(html.contains("<p id=\"health\" class=\"health ok\">HEALTH_OK</p>"));
        assert!(html.contains("id=\"client-7\""));
        assert!(
            html.contains(&format!("trash: 3 entries, {}", human(2048))),
            "{html}"
        );
        assert!(
            html.contains("<td class=\"version\">2 (0.1.0)</td>"),
            "{html}"
        );
    }

    #[test]
    fn deltas_survive_a_restart() {
        let a = OpTotals {
            ops: 10,
            op_micros: 5000,
            read_bytes: 1,
            written_bytes: 2,
        };
        let d = delta(&OpTotals::default(), &a);
        assert_eq!(d, OpTotals::default());
        assert_eq!(mean_ms(&a), 0.5);
    }
}
