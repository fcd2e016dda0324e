//! HTML building: escaping, the page layout, and small SVG charts (drawn
//! with presentation attributes only, so the CSP needs no inline styles).

use std::fmt::Write;

use cloister_host::jobs::JobEvent;

use crate::auth::Caller;

/// Escapes text for HTML content and attribute values. Control,
/// bidirectional and invisible format characters are shown as visible
/// `\u{…}` escapes (`cloister_host::text::neutralize`), so no stored text
/// reads differently from what it is.
pub(crate) fn esc(s: &str) -> String {
    let s = cloister_host::text::neutralize(s);
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page with the navigation for the caller's roles.
pub(crate) fn page(title: &str, caller: Option<&Caller>, body: &str) -> String {
    let mut nav = String::new();
    if let Some(c) = caller {
        let mut links = vec![("/", "Home"), ("/datasets", "Datasets")];
        links.extend(c.nav.iter().copied());
        for (href, text) in links {
            let _ = write!(nav, "<a href=\"{href}\">{text}</a> ");
        }
        let _ = write!(
            nav,
            "<form class=\"logout\" method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><span>{} ({})</span> <button>Log out</button></form>",
            esc(c.csrf.as_deref().unwrap_or("")),
            esc(&c.user.name),
            esc(&roles(c))
        );
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · Cloister</title><link rel=\"stylesheet\" href=\"/static/style.css\"><script src=\"/static/app.js\" defer></script></head><body><header><strong>Cloister</strong> <nav>{nav}</nav></header><main><h1>{}</h1>{body}</main></body></html>",
        esc(title),
        esc(title)
    )
}

pub(crate) fn roles(c: &Caller) -> String {
    c.user
        .roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A hidden CSRF field for a form.
pub(crate) fn csrf(c: &Caller) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(c.csrf.as_deref().unwrap_or(""))
    )
}

/// A small POST form with one button.
pub(crate) fn button(c: &Caller, action: &str, label: &str) -> String {
    format!(
        "<form class=\"inline\" method=\"post\" action=\"{}\">{}<button>{}</button></form>",
        esc(action),
        csrf(c),
        esc(label)
    )
}

/// A table from rows of already-escaped cells.
pub(crate) fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table><thead><tr>");
    for h in head {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr></thead><tbody>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{c}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

pub(crate) fn f4(v: f64) -> String {
    format!("{v:.4}")
}

pub(crate) fn opt4(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), f4)
}

/// Horizontal bars, one per (label, value).
pub(crate) fn bars(title: &str, items: &[(String, f64)]) -> String {
    let max = items.iter().map(|i| i.1).fold(0.0, f64::max).max(1e-9);
    let h = 22 * items.len() + 30;
    let mut s = format!(
        "<svg class=\"chart\" role=\"img\" aria-label=\"{}\" viewBox=\"0 0 520 {h}\" width=\"520\" height=\"{h}\"><text x=\"0\" y=\"14\" font-size=\"13\">{}</text>",
        esc(title),
        esc(title)
    );
    for (i, (label, v)) in items.iter().enumerate() {
        let y = 24 + 22 * i;
        let w = (300.0 * v / max).max(1.0);
        let _ = write!(
            s,
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text><rect x=\"150\" y=\"{y}\" width=\"{w:.1}\" height=\"16\" fill=\"#4a78b5\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"12\">{}</text>",
            y + 12,
            esc(&truncate(label, 20)),
            155.0 + w,
            y + 12,
            fmt_num(*v)
        );
    }
    s.push_str("</svg>");
    s
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

fn truncate(s: &str, n: usize) -> String {
    let mut t: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        t.push('…');
    }
    t
}

/// One line of a chart: (name, colour, points).
pub(crate) type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// Lines over a shared x axis.
pub(crate) fn lines(title: &str, x_label: &str, series: &[Series<'_>]) -> String {
    let pts: Vec<&(f64, f64)> = series.iter().flat_map(|s| s.2.iter()).collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts.iter().map(|p| (p.0, p.1)) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if pts.is_empty() {
        return String::new();
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        // A flat series (say, a validation accuracy that never moved) is
        // drawn across the middle, not along the axis.
        let pad = (y0.abs() * 0.01).max(1e-3);
        y0 -= pad;
        y1 += pad;
    }
    let (w, h, l, t) = (520.0, 240.0, 50.0, 24.0);
    let (pw, ph) = (w - l - 20.0, h - t - 40.0);
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| t + ph - (y - y0) / (y1 - y0) * ph;
    let mut s = format!(
        "<svg class=\"chart\" role=\"img\" aria-label=\"{}\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\"><text x=\"0\" y=\"14\" font-size=\"13\">{}</text><line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"#888\"/>",
        esc(title),
        esc(title),
        t + ph,
        l + pw,
        t + ph,
        t + ph
    );
    let _ = write!(
        s,
        "<text x=\"2\" y=\"{:.0}\" font-size=\"11\">{}</text><text x=\"2\" y=\"{:.0}\" font-size=\"11\">{}</text><text x=\"{l}\" y=\"{:.0}\" font-size=\"11\">{}</text><text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\" text-anchor=\"end\">{}</text><text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
        t + 8.0,
        fmt_num(y1),
        t + ph,
        fmt_num(y0),
        t + ph + 14.0,
        fmt_num(x0),
        l + pw,
        t + ph + 14.0,
        fmt_num(x1),
        l + pw / 2.0,
        t + ph + 30.0,
        esc(x_label)
    );
    for (i, (name, colour, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for (x, y) in points {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{colour}\"/>",
                sx(*x),
                sy(*y)
            );
        }
        let _ = write!(
            s,
            "<text x=\"{:.0}\" y=\"{}\" font-size=\"11\" fill=\"{colour}\">{}</text>",
            l + 10.0 + 130.0 * i as f64,
            t - 6.0 + 12.0,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// A confusion-matrix heat map.
pub(crate) fn heatmap(classes: &[String], m: &[Vec<u64>]) -> String {
    let k = classes.len().max(1);
    let cell = (360 / k).clamp(12, 60);
    let (l, t) = (110usize, 40usize);
    let size_w = (l + cell * k + 10).max(340);
    let size_h = t + cell * k + 10;
    let max = m.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let mut s = format!(
        "<svg class=\"chart\" role=\"img\" aria-label=\"confusion matrix\" viewBox=\"0 0 {size_w} {size_h}\" width=\"{size_w}\" height=\"{size_h}\"><text x=\"0\" y=\"14\" font-size=\"13\">confusion (rows: truth, columns: predicted)</text>"
    );
    for (i, row) in m.iter().enumerate() {
        let _ = write!(
            s,
            "<text x=\"0\" y=\"{}\" font-size=\"11\">{}</text>",
            t + cell * i + cell / 2 + 4,
            esc(&truncate(classes.get(i).map_or("", String::as_str), 14))
        );
        for (j, v) in row.iter().enumerate() {
            let a = (*v as f64 / max).sqrt();
            let shade = (255.0 - 200.0 * a) as u8;
            let _ = write!(
                s,
                "<rect x=\"{}\" y=\"{}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({shade},{shade},255)\" stroke=\"#fff\"><title>{} → {}: {v}</title></rect>",
                l + cell * j,
                t + cell * i,
                esc(classes.get(i).map_or("", String::as_str)),
                esc(classes.get(j).map_or("", String::as_str))
            );
            if cell >= 28 {
                let _ = write!(
                    s,
                    "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{v}</text>",
                    l + cell * j + cell / 2,
                    t + cell * i + cell / 2 + 4
                );
            }
        }
    }
    s.push_str("</svg>");
    s
}

/// One progress line for a job event.
pub(crate) fn job_event_line(e: &JobEvent<'_>) -> Option<String> {
    Some(match e {
        JobEvent::Stage(s) => s.to_string(),
        JobEvent::Training {
            round,
            template,
            records,
        } => format!("round {round}: training {template} on {records} labels"),
        JobEvent::Trained { round, score } => format!(
            "round {round}: {} validation accuracy {:.4}",
            score.template, score.val_accuracy
        ),
        JobEvent::Round(r) => format!(
            "round {}: {} automatic labels, {} queued",
            r.round, r.auto_accepted, r.queued
        ),
        JobEvent::Answered { round, answered } => format!("round {round}: {answered} answers"),
        JobEvent::Waiting { open } => format!("waiting for labelers: {open} open items"),
        JobEvent::Finished(f) => format!("finished: test accuracy {:.4}", f.test_accuracy),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }

    #[test]
    fn escaping_shows_bidi_and_invisible_characters() {
        assert_eq!(esc("ok\u{202E}txt.exe"), "ok\\u{202E}txt.exe");
        assert_eq!(esc("a\u{200B}b"), "a\\u{200B}b");
        assert_eq!(esc("line\nnext"), "line\nnext");
    }

    #[test]
    fn charts_escape_labels() {
        let svg = bars("t", &[("<b>".into(), 3.0)]);
        assert!(svg.contains("&lt;b&gt;") && !svg.contains("<b>"));
        let svg = heatmap(&["<a>".into()], &[vec![1]]);
        assert!(!svg.contains("<a>"));
    }
}
