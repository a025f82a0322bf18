//! Result tables (Markdown) and the ratio chart (hand-written SVG).

use std::collections::HashMap;
use std::fmt::Write as _;

#[derive(Clone, Debug)]
pub enum Row {
    Values(Vec<f64>),
    /// Ran and moved wrong or missing bytes (or errors): never a number.
    Failed(String),
    /// The system could not be run here (e.g. it did not start).
    Unavailable(String),
    /// The scenario does not apply to this system by design; the reason is shown.
    NotApplicable(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

pub struct Column {
    pub name: &'static str,
    pub better: Better,
}

impl Column {
    pub fn new(name: &'static str, better: Better) -> Column {
        Column { name, better }
    }
}

pub struct Table {
    pub title: String,
    pub note: String,
    pub columns: Vec<Column>,
    /// Rows in system order.
    pub rows: Vec<(String, Row)>,
    /// Column shown in the chart.
    pub chart_column: Option<usize>,
}

pub const DIRECT: &str = "direct";
pub const USERSPACE: &str = "daemon userspace";

impl Table {
    pub fn new(title: String, note: String, columns: Vec<Column>, chart: Option<usize>) -> Table {
        Table {
            title,
            note,
            columns,
            rows: Vec::new(),
            chart_column: chart,
        }
    }

    pub fn set(&mut self, system: &str, row: Row) {
        self.rows.retain(|(s, _)| s != system);
        self.rows.push((system.to_string(), row));
    }

    fn value(&self, system: &str, col: usize) -> Option<f64> {
        self.rows.iter().find_map(|(s, r)| match r {
            Row::Values(v) if s == system => v.get(col).copied(),
            _ => None,
        })
    }

    /// value / base, or None when there is no usable base.
    pub fn ratio(&self, system: &str, base: &str, col: usize) -> Option<f64> {
        let v = self.value(system, col)?;
        let b = self.value(base, col)?;
        (b.abs() > 1e-12 && v.is_finite()).then(|| v / b)
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### {}\n", self.title);
        if !self.note.is_empty() {
            let _ = writeln!(s, "{}\n", self.note);
        }
        s.push_str("| system |");
        for c in &self.columns {
            let arrow = if c.better == Better::Higher {
                "↑"
            } else {
                "↓"
            };
            let _ = write!(s, " {} {arrow} | ×direct | ×userspace |", c.name);
        }
        s.push('\n');
        s.push_str("|---|");
        for _ in &self.columns {
            s.push_str("---:|---:|---:|");
        }
        s.push('\n');
        for (sys, row) in &self.rows {
            let _ = write!(s, "| {sys} |");
            match row {
                Row::Values(v) => {
                    for (i, x) in v.iter().enumerate() {
                        let r = |b| {
                            self.ratio(sys, b, i)
                                .map(|r| format!("{r:.2}"))
                                .unwrap_or_else(|| "–".into())
                        };
                        let _ = write!(s, " {} | {} | {} |", fmt_num(*x), r(DIRECT), r(USERSPACE));
                    }
                }
                Row::Failed(why) => {
                    let _ = write!(s, " **FAILED**: {} |", why.replace('|', "/"));
                    for _ in 1..self.columns.len() * 3 {
                        s.push_str(" |");
                    }
                }
                Row::Unavailable(why) | Row::NotApplicable(why) => {
                    let _ = write!(s, " n/a: {} |", why.replace('|', "/"));
                    for _ in 1..self.columns.len() * 3 {
                        s.push_str(" |");
                    }
                }
            }
            s.push('\n');
        }
        s.push('\n');
        s
    }
}

pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let a = x.abs();
    if a >= 10_000.0 {
        let n = x.round() as i64;
        let digits = n.abs().to_string();
        let mut out = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(ch);
        }
        if n < 0 {
            out.insert(0, '-');
        }
        out
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 0.1 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// A horizontal grouped bar chart: for each table's chart column, each system's ratio to
/// the baseline (direct where it has a value, else the daemon's userspace path). Bars are
/// oriented so longer is always better ("×better than baseline"), on a log scale.
pub fn svg(tables: &[Table], systems: &[&str]) -> String {
    let colors: HashMap<&str, &str> = [
        ("direct", "#777777"),
        ("daemon ebpf", "#1b7837"),
        ("daemon zero-hop", "#00441b"),
        ("daemon userspace", "#5aae61"),
        ("node http-proxy", "#d6604d"),
        ("nginx", "#4393c3"),
        ("nginx pooled", "#92c5de"),
        ("haproxy", "#8073ac"),
    ]
    .into_iter()
    .collect();
    struct Group {
        label: String,
        bars: Vec<(String, Option<f64>, String)>,
    }
    let mut groups = Vec::new();
    for t in tables {
        let Some(col) = t.chart_column else { continue };
        let base = if t.value(DIRECT, col).is_some_and(|v| v > 0.0) {
            DIRECT
        } else {
            USERSPACE
        };
        let better = t.columns[col].better;
        let mut bars = Vec::new();
        for sys in systems {
            let Some((_, row)) = t.rows.iter().find(|(s, _)| s == sys) else {
                continue;
            };
            let (val, text) = match row {
                Row::Values(_) => match t.ratio(sys, base, col) {
                    Some(r) if r > 0.0 => {
                        let good = if better == Better::Higher { r } else { 1.0 / r };
                        (Some(good), format!("{good:.2}×"))
                    }
                    _ => (None, "–".into()),
                },
                Row::Failed(_) => (None, "FAILED".into()),
                Row::Unavailable(_) | Row::NotApplicable(_) => (None, "n/a".into()),
            };
            bars.push((sys.to_string(), val, text));
        }
        let dir = if better == Better::Higher {
            "higher"
        } else {
            "lower"
        };
        groups.push(Group {
            label: format!(
                "{} — {} ({} is better; vs {base})",
                t.title, t.columns[col].name, dir
            ),
            bars,
        });
    }
    let (left, width, bar_h, gap) = (190.0, 900.0, 14.0, 30.0);
    let plot_w = width - left - 80.0;
    // log scale from 1/32 to 4
    let (lo, hi) = (1.0f64 / 32.0, 4.0f64);
    let xpos = |r: f64| left + plot_w * ((r.clamp(lo, hi).ln() - lo.ln()) / (hi.ln() - lo.ln()));
    let height: f64 = 60.0
        + groups
            .iter()
            .map(|g| gap + bar_h * g.bars.len() as f64)
            .sum::<f64>()
        + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">project-ingress-proxy benchmark: how many times better than the baseline (log scale; 1× = baseline, longer is better)</text>"#
    );
    let top = 40.0;
    for r in [1.0 / 32.0, 1.0 / 8.0, 0.25, 0.5, 1.0, 2.0, 4.0] {
        let x = xpos(r);
        let stroke = if r == 1.0 { "#000" } else { "#ddd" };
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="{stroke}"/>"##,
            height - 25.0
        );
        let label = if r < 1.0 {
            format!("1/{}", (1.0 / r).round())
        } else {
            format!("{r}")
        };
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}×</text>"#,
            height - 10.0
        );
    }
    let mut y = top;
    for g in &groups {
        y += gap;
        let _ = writeln!(
            s,
            r#"<text x="10" y="{:.1}" font-weight="bold">{}</text>"#,
            y - 6.0,
            xml(&g.label)
        );
        for (sys, val, text) in &g.bars {
            let color = colors.get(sys.as_str()).copied().unwrap_or("#999");
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + bar_h - 3.0,
                xml(sys)
            );
            if let Some(v) = val {
                let x0 = xpos(lo);
                let x1 = xpos(*v);
                let _ = writeln!(
                    s,
                    r#"<rect x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}"/>"#,
                    (x1 - x0).max(1.0),
                    bar_h - 2.0
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                    x1 + 4.0,
                    y + bar_h - 3.0,
                    xml(text)
                );
            } else {
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" fill="#b00">{}</text>"##,
                    xpos(lo) + 4.0,
                    y + bar_h - 3.0,
                    xml(text)
                );
            }
            y += bar_h;
        }
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
