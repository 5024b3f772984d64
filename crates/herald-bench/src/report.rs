//! The report: a table on stdout, `<out>.json` and `<out>.md`, with the targets of issue #9
//! judged as met or not met.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::run::{Report, RunReport, Stage};

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    /// None: not measured in this invocation.
    pub met: Option<bool>,
}

fn stage<'a>(stages: &'a [Stage], prefix: &str) -> Option<&'a Stage> {
    stages.iter().find(|s| s.name.starts_with(prefix))
}

fn run<'a>(report: &'a Report, name: &str) -> Option<&'a RunReport> {
    report.runs.iter().find(|r| r.name == name)
}

pub fn targets(report: &Report) -> Vec<Target> {
    let mut targets = Vec::new();
    let max = run(report, "max");
    targets.push(match (max, &report.ceiling) {
        (Some(max), Some(ceiling)) => {
            let herald = max
                .sustained_settled_per_sec
                .min(max.sustained_provider_per_sec);
            let ratio = herald / ceiling.sustained_per_sec;
            Target {
                target: "sustained end-to-end throughput ≥ 50% of the two-hop broker ceiling"
                    .into(),
                measured: format!(
                    "{herald:.0}/s of {:.0}/s = {:.1}%",
                    ceiling.sustained_per_sec,
                    ratio * 100.0
                ),
                met: Some(ratio >= 0.5),
            }
        }
        _ => Target {
            target: "sustained end-to-end throughput ≥ 50% of the two-hop broker ceiling".into(),
            measured: "not measured (needs the throughput scenario and the ceiling)".into(),
            met: None,
        },
    });
    let half = run(report, "half-rate").and_then(|r| {
        let p = stage(&r.cumulative, "publish→provider")?;
        Some((r, p))
    });
    targets.push(match half {
        Some((r, p)) => Target {
            target: "p99 publish→provider < 100 ms at half the maximum throughput".into(),
            measured: format!(
                "p99 {:.1} ms at {:.0}/s (p50 {:.1} ms, n = {})",
                p.latency.p99,
                r.target_rate.unwrap_or(f64::NAN),
                p.latency.p50,
                p.latency.n
            ),
            met: Some(p.latency.p99 < 100.0 && p.latency.n > 0),
        },
        None => Target {
            target: "p99 publish→provider < 100 ms at half the maximum throughput".into(),
            measured: "not measured (needs --half-rate)".into(),
            met: None,
        },
    });
    targets.push(
        match report
            .backlog
            .as_ref()
            .and_then(|b| Some((b, stage(&b.during_send_backlog, "publish→provider")?)))
        {
            Some((b, p)) => Target {
                target: "urgent p99 < 1 s while 100,000 bulk are queued".into(),
                measured: format!(
                    "p99 {:.0} ms (p50 {:.0} ms, n = {}) with {} → {} bulk jobs queued on the lane",
                    p.latency.p99,
                    p.latency.p50,
                    p.latency.n,
                    b.bulk_lane_depth_before,
                    b.bulk_lane_depth_after
                ),
                met: Some(p.latency.p99 < 1000.0 && p.latency.n > 0 && b.backlog >= 100_000),
            },
            None => Target {
                target: "urgent p99 < 1 s while 100,000 bulk are queued".into(),
                measured: "not measured (needs --scenario urgent-under-backlog)".into(),
                met: None,
            },
        },
    );
    let rss: Vec<String> = report
        .services
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s.name,
                s.peak_rss_mib.map_or("?".into(), |m| format!("{m:.1} MiB"))
            )
        })
        .collect();
    targets.push(Target {
        target: "≤ 64 MiB RSS per service at load (peak, VmHWM)".into(),
        measured: rss.join(", "),
        met: Some(
            report
                .services
                .iter()
                .all(|s| s.peak_rss_mib.is_some_and(|m| m <= 64.0)),
        ),
    });
    let ready: Vec<String> = report
        .services
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s.name,
                s.ready_ms.map_or("?".into(), |m| format!("{m:.0} ms"))
            )
        })
        .collect();
    targets.push(Target {
        target: "every service ready < 1 s after spawn (dependencies up)".into(),
        measured: ready.join(", "),
        met: Some(
            report
                .services
                .iter()
                .all(|s| s.ready_ms.is_some_and(|m| m < 1000.0)),
        ),
    });
    targets
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT MET",
        None => "not measured",
    }
}

fn stages_table(out: &mut String, stages: &[Stage]) {
    let _ = writeln!(out, "| stage | n | p50 ms | p90 ms | p99 ms | max ms |");
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: |");
    for s in stages {
        let l = &s.latency;
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s.name, l.n, l.p50, l.p90, l.p99, l.max
        );
    }
}

pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let _ = writeln!(out, "# herald-bench report\n");
    let _ = writeln!(
        out,
        "{} · {} cores · {} · load average at start {:.2} · body {} bytes · provider latency {} ms · callback delay {} ms · window {}\n",
        m.started_at,
        m.nproc,
        m.model,
        m.load_average_at_start.unwrap_or(f64::NAN),
        report.body_bytes,
        report.provider_latency_ms,
        report.callback_delay_ms,
        report.window
    );
    let _ = writeln!(out, "## Targets\n");
    let _ = writeln!(out, "| target | measured | verdict |");
    let _ = writeln!(out, "| --- | --- | --- |");
    for t in targets(report) {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            t.target,
            t.measured,
            verdict(t.met)
        );
    }
    if let Some(c) = &report.ceiling {
        let _ = writeln!(
            out,
            "\n## Broker ceiling (two confirmed hops, quorum queues)\n\n{} messages: **{:.0}/s** sustained, publish {:.0}/s; publish→consumed p50 {:.0} ms, p99 {:.0} ms\n",
            c.messages, c.sustained_per_sec, c.publish_per_sec, c.latency.p50, c.latency.p99
        );
    }
    for r in &report.runs {
        let _ = writeln!(
            out,
            "\n## Run `{}` ({:?}, {} notifications, {})\n",
            r.name,
            r.via,
            r.notifications,
            r.target_rate
                .map_or("as fast as possible".into(), |x| format!("{x:.0}/s"))
        );
        let _ = writeln!(
            out,
            "published {:.0}/s · **{:.0}/s to the provider**, **{:.0}/s settled** (10th–90th percentile) · wall {:.1} s · unsettled {} · machine busy {:.0}% of 200% · load {:.2}\n",
            r.publish_per_sec,
            r.sustained_provider_per_sec,
            r.sustained_settled_per_sec,
            r.wall_seconds,
            r.incomplete,
            r.machine_busy_percent,
            r.load_average.unwrap_or(f64::NAN)
        );
        if let Some(db) = &r.db_per_notification {
            let _ = writeln!(
                out,
                "Postgres per notification (this run's database): {:.1} commits, {:.1} rows inserted, {:.1} updated, {:.1} deleted\n",
                db.commits, db.inserted, db.updated, db.deleted
            );
        }
        stages_table(&mut out, &r.cumulative);
        let _ = writeln!(out);
        stages_table(&mut out, &r.segments);
        let _ = writeln!(
            out,
            "\n| process | CPU s | CPU s per 1,000 |\n| --- | ---: | ---: |"
        );
        for c in &r.cpu {
            let _ = writeln!(
                out,
                "| {} | {:.2} | {:.2} |",
                c.name, c.cpu_seconds, c.cpu_ms_per_notification
            );
        }
    }
    if let Some(b) = &report.backlog {
        let _ = writeln!(
            out,
            "\n## Urgent under a bulk backlog\n\n{} bulk deliveries ({} requests of {}) rendered and queued in {:.1} s; bulk lane {} → {} jobs while the urgent ones ran\n\nUrgent, published while the bulk requests were still being rendered:\n",
            b.backlog,
            b.bulk_requests,
            b.fanout,
            b.render_seconds,
            b.bulk_lane_depth_before,
            b.bulk_lane_depth_after
        );
        stages_table(&mut out, &b.during_render);
        let _ = writeln!(
            out,
            "\nUrgent, published with the backlog queued on the bulk lane:\n"
        );
        stages_table(&mut out, &b.during_send_backlog);
    }
    let _ = writeln!(
        out,
        "\n## Services\n\n| process | spawn → ready ms | peak RSS MiB |\n| --- | ---: | ---: |"
    );
    for s in &report.services {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            s.name,
            s.ready_ms.map_or("?".into(), |m| format!("{m:.0}")),
            s.peak_rss_mib.map_or("?".into(), |m| format!("{m:.1}"))
        );
    }
    out
}

pub fn print(report: &Report) {
    println!("{}", markdown(report));
}

pub fn write(report: &Report, out: &Path) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct WithTargets<'a> {
        #[serde(flatten)]
        report: &'a Report,
        targets: Vec<Target>,
    }
    let json = serde_json::to_string_pretty(&WithTargets {
        report,
        targets: targets(report),
    })?;
    std::fs::write(out.with_extension("json"), json)?;
    std::fs::write(out.with_extension("md"), markdown(report))?;
    Ok(())
}
