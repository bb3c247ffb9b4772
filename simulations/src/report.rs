//! Renders one simulation run as a picture: backlog, throughput, link state
//! and drain over simulated time, as one self-contained SVG or an HTML page
//! around it, because people would rather look at a run than read its log.
//!
//! The SVG is written by hand (std only): the picture is a few panels of
//! polylines and rectangles, which does not justify a plotting dependency.
//! Output depends only on the [`Timeline`], so a replayed run renders
//! byte-identically; every text is escaped, and no input makes it panic.

use std::fmt::{self, Write as _};

/// What one simulation run recorded, sampled on simulated time.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// E.g. "partition-flap · seed 7".
    pub title: String,
    /// The command that replays this run exactly.
    pub replay_command: String,
    /// Edge node ids, in the order of [`Sample::edges`].
    pub edges: Vec<String>,
    /// Each edge's outbox budget, drawn as a limit line; 0 draws none.
    pub outbox_bytes_max: u64,
    /// In time order, every sample interval of simulated time.
    pub samples: Vec<Sample>,
    /// Faults (with a span when they last), crashes, restarts.
    pub events: Vec<TimelineEvent>,
    /// End of the safety (fault) phase; the liveness phase follows.
    pub faults_end_ms: u64,
    /// When the backlog drained after faults, if it did.
    pub drained_at_ms: Option<u64>,
    /// The liveness budget after `faults_end_ms`.
    pub drain_budget_ms: u64,
    /// Ok = all invariants held; Err = the violation.
    pub verdict: Result<(), String>,
    /// Key figures shown in a table: (name, value).
    pub figures: Vec<(String, String)>,
}

// By hand because `Result` has no `Default`; an empty run violated nothing.
impl Default for Timeline {
    fn default() -> Timeline {
        Timeline {
            title: String::new(),
            replay_command: String::new(),
            edges: Vec::new(),
            outbox_bytes_max: 0,
            samples: Vec::new(),
            events: Vec::new(),
            faults_end_ms: 0,
            drained_at_ms: None,
            drain_budget_ms: 0,
            verdict: Ok(()),
            figures: Vec::new(),
        }
    }
}

/// The state of every edge at one instant of simulated time.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Simulated time since the start.
    pub t_ms: u64,
    /// One per [`Timeline::edges`]; a missing entry draws nothing.
    pub edges: Vec<EdgeSample>,
    /// Readings committed to the log so far (all edges).
    pub log_readings_total: u64,
}

/// One edge at one sample.
#[derive(Debug, Clone, Default)]
pub struct EdgeSample {
    /// Readings in the outbox not yet confirmed by the cloud.
    pub backlog_readings: u64,
    /// Bytes the outbox uses.
    pub backlog_bytes: u64,
    /// Readings acknowledged to devices so far (grows).
    pub acked_total: u64,
    /// The uplink is connected.
    pub link_up: bool,
    /// The edge process is running (false while crashed).
    pub running: bool,
}

/// Something that happened to the system: a fault, a crash, a restart.
#[derive(Debug, Clone)]
pub struct TimelineEvent {
    pub at_ms: u64,
    /// Some for faults with a duration.
    pub until_ms: Option<u64>,
    /// "edge-1", "cloud", "link edge-1→cloud", "broker", ...
    pub target: String,
    /// "partition", "crash", "loss 20%", ...
    pub label: String,
}

// Layout, in SVG user units (pixels at 100 % zoom).
const WIDTH_PX: f64 = 1000.0;
const PLOT_LEFT_PX: f64 = 100.0;
const PLOT_RIGHT_PX: f64 = WIDTH_PX - 24.0;
const HEADER_HEIGHT_PX: f64 = 50.0;
const LEGEND_ROW_PX: f64 = 18.0;
const LABEL_ROW_PX: f64 = 14.0;
/// More rows than this would push the panels down for little gain; labels
/// beyond it share the least crowded row.
const LABEL_ROWS_MAX: usize = 4;
const MARKER_ROW_PX: f64 = 16.0;
const BACKLOG_HEIGHT_PX: f64 = 190.0;
const THROUGHPUT_HEIGHT_PX: f64 = 160.0;
const PANEL_GAP_PX: f64 = 22.0;
const STRIP_HEIGHT_PX: f64 = 14.0;
const STRIP_GAP_PX: f64 = 4.0;
const X_AXIS_HEIGHT_PX: f64 = 40.0;
const FONT_PX: f64 = 11.0;
/// Rough advance of one character of a sans-serif font, for layout only.
const CHAR_WIDTH_PX: f64 = FONT_PX * 0.6;
const Y_TICKS_TARGET: usize = 5;
const X_TICKS_TARGET: usize = 12;
/// Above this many points per series, points are thinned per pixel column
/// (keeping each column's extremes) so long runs stay small files.
const SERIES_POINTS_MAX: usize = 4 * (PLOT_RIGHT_PX - PLOT_LEFT_PX) as usize;
const EVENT_LABEL_CHARS_MAX: usize = 40;
const EDGE_NAME_CHARS_MAX: usize = 13;
const VERDICT_CHARS_MAX: usize = 110;
/// Without any time on the record, the axis still needs a span.
const EMPTY_SPAN_MS: u64 = 1000;

/// Colours of edges, cycled; green, red and amber are left out because they
/// mean link up, link down and fault.
const EDGE_COLOURS: [&str; 8] = [
    "#1f77b4", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#393b79",
];
const LOG_COLOUR: &str = "#222222";
const LINK_UP_COLOUR: &str = "#4caf50";
const LINK_DOWN_COLOUR: &str = "#e53935";
const EDGE_DOWN_COLOUR: &str = "#9e9e9e";
const FAULT_COLOUR: &str = "#ffa000";
const FAULT_TEXT_COLOUR: &str = "#8a5300";
const POINT_EVENT_COLOUR: &str = "#6d4c41";
const OK_COLOUR: &str = "#1b7a1b";
const FAIL_COLOUR: &str = "#c62828";
const GRID_COLOUR: &str = "#e6e6e6";
const FRAME_COLOUR: &str = "#9a9a9a";

/// Renders the run as one self-contained SVG document.
pub fn render_svg(t: &Timeline) -> String {
    let layout = Layout::new(t);
    let mut svg = Doc::default();
    svg.push(format_args!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"{FONT_PX}\">\n",
        w = WIDTH_PX,
        h = num(layout.height_px),
    ));
    svg.push(format_args!(
        "<rect x=\"0\" y=\"0\" width=\"{}\" height=\"{}\" fill=\"#ffffff\"/>\n",
        WIDTH_PX,
        num(layout.height_px)
    ));
    draw_header(&mut svg, t);
    draw_legend(&mut svg, &layout);
    draw_x_grid(&mut svg, &layout);
    draw_backlog(&mut svg, t, &layout);
    draw_throughput(&mut svg, t, &layout);
    draw_strips(&mut svg, t, &layout);
    // Translucent bands go over the panels so the opaque strips show them too.
    draw_bands(&mut svg, t, &layout);
    draw_event_labels(&mut svg, t, &layout);
    draw_markers(&mut svg, t, &layout);
    draw_x_axis(&mut svg, &layout);
    svg.out.push_str("</svg>\n");
    svg.out
}

/// Renders the run as an HTML page: title, verdict, the SVG inline, the key
/// figures, the events and the replay command.
pub fn render_html(t: &Timeline) -> String {
    let mut h = Doc::default();
    let title = if t.title.is_empty() {
        "simulation run"
    } else {
        t.title.as_str()
    };
    h.push(format_args!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{}</title>\n<style>\n{}</style>\n</head>\n<body>\n",
        esc(title),
        HTML_STYLE
    ));
    h.push(format_args!("<h1>{}</h1>\n", esc(title)));
    match &t.verdict {
        Ok(()) => h.push(format_args!(
            "<p class=\"verdict ok\">&#10003; All invariants held.</p>\n"
        )),
        Err(violation) => h.push(format_args!(
            "<div class=\"verdict fail\">&#10007; Invariant violated:<pre>{}</pre></div>\n",
            esc(violation)
        )),
    }
    h.push(format_args!(
        "<p class=\"phases\">{}</p>\n",
        esc(&phase_summary(t))
    ));
    h.push(format_args!("<figure>\n{}</figure>\n", render_svg(t)));

    if !t.figures.is_empty() {
        h.out.push_str("<h2>Key figures</h2>\n<table>\n");
        for (name, value) in &t.figures {
            h.push(format_args!(
                "<tr><th>{}</th><td>{}</td></tr>\n",
                esc(name),
                esc(value)
            ));
        }
        h.out.push_str("</table>\n");
    }

    h.out.push_str("<h2>Events</h2>\n");
    if t.events.is_empty() {
        h.out.push_str("<p>No faults, crashes or restarts.</p>\n");
    } else {
        h.out.push_str(
            "<table>\n<tr><th>at</th><th>until</th><th>lasted</th>\
             <th>target</th><th>event</th></tr>\n",
        );
        for e in events_by_time(t) {
            let (until, lasted) = match e.until_ms {
                Some(u) => (secs(u), secs(u.saturating_sub(e.at_ms))),
                None => (String::new(), String::new()),
            };
            h.push(format_args!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                esc(&secs(e.at_ms)),
                esc(&until),
                esc(&lasted),
                esc(&e.target),
                esc(&e.label)
            ));
        }
        h.out.push_str("</table>\n");
    }

    h.out.push_str("<h2>Replay</h2>\n");
    if t.replay_command.is_empty() {
        h.out.push_str("<p>No replay command was recorded.</p>\n");
    } else {
        h.push(format_args!(
            "<p>Replays this run exactly:</p>\n<pre class=\"replay\"><code>{}</code></pre>\n",
            esc(&t.replay_command)
        ));
    }
    h.out.push_str("</body>\n</html>\n");
    h.out
}

const HTML_STYLE: &str = "\
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1040px; }
h1 { font-size: 22px; margin-bottom: 8px; }
h2 { font-size: 17px; margin-top: 28px; }
.verdict { padding: 8px 12px; border-radius: 4px; font-weight: bold; }
.verdict.ok { background: #e3f4e3; color: #1b5e20; border: 1px solid #81c784; }
.verdict.fail { background: #fdecea; color: #b71c1c; border: 1px solid #e57373; }
.verdict pre { font-weight: normal; white-space: pre-wrap; margin: 6px 0 0 0; }
.phases { color: #555; }
figure { margin: 12px 0; }
figure svg { max-width: 100%; height: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 3px 10px; text-align: left; font-size: 13px; }
th { background: #f5f5f5; }
pre.replay { background: #f5f5f5; padding: 8px 12px; white-space: pre-wrap; word-break: break-all; }
";

/// A document (SVG or HTML) being written.
#[derive(Default)]
struct Doc {
    out: String,
}

impl Doc {
    fn push(&mut self, args: fmt::Arguments<'_>) {
        // Writing into a String cannot fail.
        let _ = self.out.write_fmt(args);
    }

    fn text(&mut self, x: f64, y: f64, anchor: &str, attrs: &str, content: &str) {
        self.push(format_args!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\"{attrs}>{}</text>\n",
            num(x),
            num(y),
            esc(content)
        ));
    }

    fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), attrs: &str) {
        self.push(format_args!(
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\"{attrs}/>\n",
            num(x1),
            num(y1),
            num(x2),
            num(y2)
        ));
    }
}

/// Where everything goes; computed once from the timeline.
struct Layout {
    height_px: f64,
    legend_top_px: f64,
    legend: Vec<Vec<LegendItem>>,
    labels_top_px: f64,
    label_rows: usize,
    markers_top_px: f64,
    backlog_top_px: f64,
    throughput_top_px: f64,
    strips_top_px: f64,
    strips_bottom_px: f64,
    x_axis_top_px: f64,
    x: Scale,
    t_end_ms: u64,
}

impl Layout {
    fn new(t: &Timeline) -> Layout {
        let legend = legend_rows(t);
        let label_rows = t.events.len().min(LABEL_ROWS_MAX);
        let legend_top_px = HEADER_HEIGHT_PX;
        let labels_top_px = legend_top_px + legend.len() as f64 * LEGEND_ROW_PX + 4.0;
        let markers_top_px = labels_top_px + label_rows as f64 * LABEL_ROW_PX;
        let backlog_top_px = markers_top_px + MARKER_ROW_PX;
        let throughput_top_px = backlog_top_px + BACKLOG_HEIGHT_PX + PANEL_GAP_PX;
        let strips_top_px = throughput_top_px + THROUGHPUT_HEIGHT_PX + PANEL_GAP_PX;
        let strips_bottom_px =
            strips_top_px + t.edges.len() as f64 * (STRIP_HEIGHT_PX + STRIP_GAP_PX);
        let x_axis_top_px = strips_bottom_px + 2.0;
        let t_end_ms = time_end_ms(t);
        Layout {
            height_px: x_axis_top_px + X_AXIS_HEIGHT_PX,
            legend_top_px,
            legend,
            labels_top_px,
            label_rows,
            markers_top_px,
            backlog_top_px,
            throughput_top_px,
            strips_top_px,
            strips_bottom_px,
            x_axis_top_px,
            x: Scale::new(0.0, t_end_ms as f64, PLOT_LEFT_PX, PLOT_RIGHT_PX),
            t_end_ms,
        }
    }

    /// Top and bottom of the area that bands and markers span.
    fn span_px(&self) -> (f64, f64) {
        (
            self.backlog_top_px,
            self.strips_bottom_px.max(self.throughput_top_px),
        )
    }

    fn x_ms(&self, t_ms: u64) -> f64 {
        self.x.map(t_ms as f64)
    }
}

/// The end of the x axis: everything on the record must fit.
fn time_end_ms(t: &Timeline) -> u64 {
    let mut end = t.faults_end_ms;
    for s in &t.samples {
        end = end.max(s.t_ms);
    }
    for e in &t.events {
        end = end.max(e.at_ms).max(e.until_ms.unwrap_or(0));
    }
    match t.drained_at_ms {
        Some(d) => end = end.max(d),
        // The deadline missed is the point of the picture, so it is shown.
        None => end = end.max(t.faults_end_ms.saturating_add(t.drain_budget_ms)),
    }
    if end == 0 {
        EMPTY_SPAN_MS
    } else {
        end
    }
}

/// A linear map from data values to pixels; never yields NaN.
#[derive(Clone, Copy)]
struct Scale {
    lo: f64,
    hi: f64,
    px_lo: f64,
    px_hi: f64,
}

impl Scale {
    fn new(lo: f64, hi: f64, px_lo: f64, px_hi: f64) -> Scale {
        Scale {
            lo,
            hi,
            px_lo,
            px_hi,
        }
    }

    fn map(&self, v: f64) -> f64 {
        let span = self.hi - self.lo;
        if !span.is_finite() || span <= 0.0 || !v.is_finite() {
            return self.px_lo;
        }
        let f = ((v - self.lo) / span).clamp(0.0, 1.0);
        self.px_lo + f * (self.px_hi - self.px_lo)
    }
}

/// Y ticks for values up to `max`: the axis top and labelled round values.
struct Ticks {
    top: f64,
    values: Vec<(f64, String)>,
}

/// A round step (1, 2 or 5 times a power of ten) splitting `span` into about
/// `target` parts.
fn nice_step(span: f64, target: usize) -> f64 {
    if !span.is_finite() || span <= 0.0 {
        return 1.0;
    }
    let raw = span / target.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let norm = raw / magnitude;
    // Rounding to the nearest round step (not up) keeps the tick count
    // between about 0.7 and 1.5 times the target.
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// Decimals that show a multiple of `step` exactly.
fn decimals_for(step: f64) -> usize {
    if !step.is_finite() || step <= 0.0 || step >= 1.0 {
        0
    } else {
        ((-step.log10()).ceil() as usize).min(6)
    }
}

/// Ticks from 0 to at least `max`, in `unit`s of `base`^k (k picked so the
/// labels stay short): bytes use 1024 and KiB/MiB, rates 1000 and k/M.
/// `whole` keeps steps of the smallest unit whole (there is no half byte).
fn unit_ticks(max: f64, base: f64, units: &[&str], sep: &str, suffix: &str, whole: bool) -> Ticks {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let mut k = 0;
    while k + 1 < units.len() && max >= base.powi(k as i32 + 1) {
        k += 1;
    }
    let unit = base.powi(k as i32);
    let scaled = max / unit;
    let step = nice_step(scaled, Y_TICKS_TARGET);
    let step = if whole && k == 0 { step.max(1.0) } else { step };
    // The tiny slack keeps float noise (e.g. 5.0000001 steps) from adding a tick.
    let n = ((scaled / step) - 1e-9).ceil().max(1.0) as usize;
    let decimals = decimals_for(step);
    let values = (0..=n)
        .map(|i| {
            let v = i as f64 * step;
            let label = if i == 0 {
                "0".to_string()
            } else {
                format!("{v:.decimals$}{sep}{}{suffix}", units[k])
            };
            (v * unit, label)
        })
        .collect();
    Ticks {
        top: n as f64 * step * unit,
        values,
    }
}

const BYTE_UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
const RATE_UNITS: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];

fn byte_ticks(max: f64) -> Ticks {
    unit_ticks(max, 1024.0, &BYTE_UNITS, " ", "", true)
}

fn rate_ticks(max: f64) -> Ticks {
    unit_ticks(max, 1000.0, &RATE_UNITS, "", "/s", false)
}

/// A byte count in the largest binary unit that keeps it at least 1.
fn human_bytes(bytes: u64) -> String {
    let mut k = 0;
    while k + 1 < BYTE_UNITS.len() && bytes as f64 >= 1024f64.powi(k as i32 + 1) {
        k += 1;
    }
    if k == 0 {
        return format!("{bytes} B");
    }
    let v = bytes as f64 / 1024f64.powi(k as i32);
    let text = format!("{v:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", BYTE_UNITS[k])
}

/// Simulated milliseconds as seconds, exactly: "12 s", "12.5 s", "0.004 s".
fn secs(ms: u64) -> String {
    let whole = ms / 1000;
    let frac = ms % 1000;
    if frac == 0 {
        return format!("{whole} s");
    }
    let frac = format!("{frac:03}");
    format!("{whole}.{} s", frac.trim_end_matches('0'))
}

/// Pixel coordinates with one decimal: enough for the eye, short to write.
fn num(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let text = format!("{v:.1}");
    match text.strip_suffix(".0") {
        Some("-0") => "0".to_string(),
        Some(whole) => whole.to_string(),
        None => text,
    }
}

/// Escapes text for XML content and attribute values. Control characters
/// that XML 1.0 forbids become U+FFFD so the document stays well-formed.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// At most `chars_max` characters, with an ellipsis when cut.
fn truncate(s: &str, chars_max: usize) -> String {
    if s.chars().count() <= chars_max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(chars_max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn text_width_px(s: &str) -> f64 {
    s.chars().count() as f64 * CHAR_WIDTH_PX
}

fn edge_colour(i: usize) -> &'static str {
    EDGE_COLOURS[i % EDGE_COLOURS.len()]
}

fn edge_name(t: &Timeline, i: usize) -> &str {
    t.edges.get(i).map(String::as_str).unwrap_or("")
}

fn draw_header(svg: &mut Doc, t: &Timeline) {
    let title = if t.title.is_empty() {
        "simulation run"
    } else {
        t.title.as_str()
    };
    svg.text(
        PLOT_LEFT_PX,
        22.0,
        "start",
        " font-size=\"16\" font-weight=\"bold\"",
        &truncate(title, 100),
    );
    match &t.verdict {
        Ok(()) => svg.text(
            PLOT_LEFT_PX,
            40.0,
            "start",
            &format!(" font-size=\"12\" font-weight=\"bold\" fill=\"{OK_COLOUR}\""),
            "✓ all invariants held",
        ),
        Err(violation) => {
            // The first line is what fits; the full text is the tooltip.
            let first = violation.lines().next().unwrap_or("");
            svg.push(format_args!(
                "<text x=\"{}\" y=\"40\" text-anchor=\"start\" font-size=\"12\" \
                 font-weight=\"bold\" fill=\"{FAIL_COLOUR}\"><title>{}</title>{}</text>\n",
                num(PLOT_LEFT_PX),
                esc(violation),
                esc(&truncate(
                    &format!("✗ violation: {first}"),
                    VERDICT_CHARS_MAX
                ))
            ));
        }
    }
}

/// What a legend entry looks like.
enum Swatch {
    Line {
        colour: &'static str,
        width: f64,
        dash: bool,
    },
    Block {
        colour: &'static str,
        opacity: f64,
    },
}

struct LegendItem {
    swatch: Swatch,
    text: String,
}

impl LegendItem {
    fn width_px(&self) -> f64 {
        26.0 + text_width_px(&self.text) + 14.0
    }
}

/// Legend entries, flowed into rows that fit the plot width.
fn legend_rows(t: &Timeline) -> Vec<Vec<LegendItem>> {
    let mut items = Vec::new();
    for (i, name) in t.edges.iter().enumerate() {
        items.push(LegendItem {
            swatch: Swatch::Line {
                colour: edge_colour(i),
                width: 2.0,
                dash: false,
            },
            text: truncate(name, EDGE_NAME_CHARS_MAX),
        });
    }
    items.push(LegendItem {
        swatch: Swatch::Line {
            colour: LOG_COLOUR,
            width: 2.0,
            dash: false,
        },
        text: "readings into log".to_string(),
    });
    if t.outbox_bytes_max > 0 {
        items.push(LegendItem {
            swatch: Swatch::Line {
                colour: FAIL_COLOUR,
                width: 1.2,
                dash: true,
            },
            text: "outbox budget".to_string(),
        });
    }
    for (colour, opacity, text) in [
        (LINK_UP_COLOUR, 1.0, "link up"),
        (LINK_DOWN_COLOUR, 1.0, "link down"),
        (EDGE_DOWN_COLOUR, 1.0, "edge not running"),
        (FAULT_COLOUR, 0.3, "fault"),
    ] {
        items.push(LegendItem {
            swatch: Swatch::Block { colour, opacity },
            text: text.to_string(),
        });
    }
    let mut rows: Vec<Vec<LegendItem>> = vec![Vec::new()];
    let mut x = PLOT_LEFT_PX;
    for item in items {
        let w = item.width_px();
        if x + w > PLOT_RIGHT_PX && rows.last().is_some_and(|r| !r.is_empty()) {
            rows.push(Vec::new());
            x = PLOT_LEFT_PX;
        }
        x += w;
        if let Some(row) = rows.last_mut() {
            row.push(item);
        }
    }
    rows
}

fn draw_legend(svg: &mut Doc, layout: &Layout) {
    svg.out.push_str("<g class=\"legend\">\n");
    for (r, row) in layout.legend.iter().enumerate() {
        let y = layout.legend_top_px + r as f64 * LEGEND_ROW_PX + LEGEND_ROW_PX / 2.0;
        let mut x = PLOT_LEFT_PX;
        for item in row {
            match item.swatch {
                Swatch::Line {
                    colour,
                    width,
                    dash,
                } => {
                    let dash = if dash {
                        " stroke-dasharray=\"5 3\""
                    } else {
                        ""
                    };
                    svg.line(
                        (x, y),
                        (x + 20.0, y),
                        &format!(" stroke=\"{colour}\" stroke-width=\"{width}\"{dash}"),
                    );
                }
                Swatch::Block { colour, opacity } => svg.push(format_args!(
                    "<rect x=\"{}\" y=\"{}\" width=\"20\" height=\"10\" fill=\"{colour}\" \
                     fill-opacity=\"{opacity}\"/>\n",
                    num(x),
                    num(y - 5.0)
                )),
            }
            svg.text(x + 26.0, y + 4.0, "start", "", &item.text);
            x += item.width_px();
        }
    }
    svg.out.push_str("</g>\n");
}

/// Ticks of the shared time axis, in milliseconds, with labels in seconds.
fn x_ticks(t_end_ms: u64) -> Vec<(f64, String)> {
    let end_s = t_end_ms as f64 / 1000.0;
    let step = nice_step(end_s, X_TICKS_TARGET).max(0.001);
    let decimals = decimals_for(step);
    let n = (end_s / step + 1e-9).floor() as usize;
    (0..=n)
        .map(|i| {
            let v = i as f64 * step;
            (v * 1000.0, format!("{v:.decimals$}"))
        })
        .collect()
}

fn draw_x_grid(svg: &mut Doc, layout: &Layout) {
    let (top, bottom) = layout.span_px();
    svg.out.push_str("<g class=\"x-grid\">\n");
    for (ms, _) in x_ticks(layout.t_end_ms) {
        let x = layout.x.map(ms);
        svg.line((x, top), (x, bottom), &format!(" stroke=\"{GRID_COLOUR}\""));
    }
    svg.out.push_str("</g>\n");
}

fn draw_x_axis(svg: &mut Doc, layout: &Layout) {
    let y = layout.x_axis_top_px;
    svg.out.push_str("<g class=\"x-axis\">\n");
    svg.line(
        (PLOT_LEFT_PX, y),
        (PLOT_RIGHT_PX, y),
        &format!(" stroke=\"{FRAME_COLOUR}\""),
    );
    for (ms, label) in x_ticks(layout.t_end_ms) {
        let x = layout.x.map(ms);
        svg.line((x, y), (x, y + 4.0), &format!(" stroke=\"{FRAME_COLOUR}\""));
        svg.text(x, y + 16.0, "middle", "", &label);
    }
    svg.text(
        (PLOT_LEFT_PX + PLOT_RIGHT_PX) / 2.0,
        y + 32.0,
        "middle",
        " fill=\"#555555\"",
        "simulated time (s)",
    );
    svg.out.push_str("</g>\n");
}

/// Frame, horizontal grid, tick labels and axis title of one panel; returns
/// the panel's y scale.
fn draw_y_axis(svg: &mut Doc, top: f64, height: f64, ticks: &Ticks, title: &str) -> Scale {
    let bottom = top + height;
    let y = Scale::new(0.0, ticks.top, bottom, top);
    for (v, label) in &ticks.values {
        let py = y.map(*v);
        svg.line(
            (PLOT_LEFT_PX, py),
            (PLOT_RIGHT_PX, py),
            &format!(" stroke=\"{GRID_COLOUR}\""),
        );
        svg.text(
            PLOT_LEFT_PX - 6.0,
            py + 4.0,
            "end",
            " fill=\"#444444\"",
            label,
        );
    }
    svg.push(format_args!(
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"{FRAME_COLOUR}\"/>\n",
        num(PLOT_LEFT_PX),
        num(top),
        num(PLOT_RIGHT_PX - PLOT_LEFT_PX),
        num(height)
    ));
    let cy = top + height / 2.0;
    svg.push(format_args!(
        "<text x=\"16\" y=\"{}\" text-anchor=\"middle\" font-weight=\"bold\" fill=\"#333333\" \
         transform=\"rotate(-90 16 {})\">{}</text>\n",
        num(cy),
        num(cy),
        esc(title)
    ));
    y
}

/// Keeps at most a few points per pixel column (first, lowest, highest,
/// last), so long runs stay small without hiding peaks.
fn thin(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    if points.len() <= SERIES_POINTS_MAX {
        return points;
    }
    let mut out = Vec::with_capacity(SERIES_POINTS_MAX);
    let mut i = 0;
    while i < points.len() {
        let column = points[i].0.floor();
        let (mut lo, mut hi) = (i, i);
        let mut j = i + 1;
        while j < points.len() && points[j].0.floor() == column {
            if points[j].1 < points[lo].1 {
                lo = j;
            }
            if points[j].1 > points[hi].1 {
                hi = j;
            }
            j += 1;
        }
        let mut keep = [i, lo, hi, j - 1];
        keep.sort_unstable();
        for (k, &idx) in keep.iter().enumerate() {
            if k == 0 || keep[k - 1] != idx {
                out.push(points[idx]);
            }
        }
        i = j;
    }
    out
}

/// One series as a polyline (a dot when it has a single point, since a
/// one-point polyline draws nothing).
fn draw_series(svg: &mut Doc, class: &str, edge: &str, points: Vec<(f64, f64)>, style: &str) {
    let points = thin(points);
    let mut coords = String::new();
    for (k, (x, y)) in points.iter().enumerate() {
        if k > 0 {
            coords.push(' ');
        }
        coords.push_str(&num(*x));
        coords.push(',');
        coords.push_str(&num(*y));
    }
    svg.push(format_args!(
        "<polyline class=\"{class}\" data-edge=\"{}\" points=\"{coords}\" fill=\"none\" \
         stroke-linejoin=\"round\"{style}/>\n",
        esc(edge)
    ));
    if let [(x, y)] = points.as_slice() {
        svg.push(format_args!(
            "<circle cx=\"{}\" cy=\"{}\" r=\"2.5\"{style}/>\n",
            num(*x),
            num(*y)
        ));
    }
}

fn draw_backlog(svg: &mut Doc, t: &Timeline, layout: &Layout) {
    let top = layout.backlog_top_px;
    let mut max = t.outbox_bytes_max as f64;
    for s in &t.samples {
        for e in &s.edges {
            max = max.max(e.backlog_bytes as f64);
        }
    }
    // Headroom keeps the budget line and its label off the frame.
    let ticks = byte_ticks(max * 1.05);
    svg.out.push_str("<g class=\"backlog-panel\">\n");
    let y = draw_y_axis(svg, top, BACKLOG_HEIGHT_PX, &ticks, "outbox backlog");
    if t.outbox_bytes_max > 0 {
        let py = y.map(t.outbox_bytes_max as f64);
        svg.line(
            (PLOT_LEFT_PX, py),
            (PLOT_RIGHT_PX, py),
            &format!(" stroke=\"{FAIL_COLOUR}\" stroke-width=\"1.2\" stroke-dasharray=\"6 4\""),
        );
        svg.text(
            PLOT_RIGHT_PX - 4.0,
            (py - 4.0).max(top + 11.0),
            "end",
            &format!(" fill=\"{FAIL_COLOUR}\""),
            &format!("outbox budget {}", human_bytes(t.outbox_bytes_max)),
        );
    }
    for (i, name) in t.edges.iter().enumerate() {
        let points = t
            .samples
            .iter()
            .filter_map(|s| {
                let e = s.edges.get(i)?;
                Some((layout.x_ms(s.t_ms), y.map(e.backlog_bytes as f64)))
            })
            .collect();
        let style = format!(" stroke=\"{}\" stroke-width=\"1.8\"", edge_colour(i));
        draw_series(svg, "backlog", name, points, &style);
    }
    svg.out.push_str("</g>\n");
}

/// A rate per second over each interval between consecutive samples of a
/// counter: (interval start ms, interval end ms, rate). A counter that goes
/// back (a restart that lost it) counts as no progress, not a negative rate.
fn rates(counter: &[(u64, u64)]) -> Vec<(u64, u64, f64)> {
    counter
        .windows(2)
        .filter_map(|w| {
            let ((t0, c0), (t1, c1)) = (w[0], w[1]);
            let dt_ms = t1.checked_sub(t0).filter(|d| *d > 0)?;
            Some((t0, t1, c1.saturating_sub(c0) as f64 * 1000.0 / dt_ms as f64))
        })
        .collect()
}

fn draw_throughput(svg: &mut Doc, t: &Timeline, layout: &Layout) {
    let top = layout.throughput_top_px;
    let log: Vec<(u64, u64)> = t
        .samples
        .iter()
        .map(|s| (s.t_ms, s.log_readings_total))
        .collect();
    let log_rates = rates(&log);
    let edge_rates: Vec<Vec<(u64, u64, f64)>> = (0..t.edges.len())
        .map(|i| {
            let acked: Vec<(u64, u64)> = t
                .samples
                .iter()
                .filter_map(|s| Some((s.t_ms, s.edges.get(i)?.acked_total)))
                .collect();
            rates(&acked)
        })
        .collect();
    let max = log_rates
        .iter()
        .chain(edge_rates.iter().flatten())
        .map(|r| r.2)
        .fold(0.0, f64::max);
    let ticks = rate_ticks(max * 1.05);
    svg.out.push_str("<g class=\"throughput-panel\">\n");
    let y = draw_y_axis(svg, top, THROUGHPUT_HEIGHT_PX, &ticks, "readings/s");
    let steps = |rs: &[(u64, u64, f64)]| -> Vec<(f64, f64)> {
        rs.iter()
            .flat_map(|&(t0, t1, r)| [(layout.x_ms(t0), y.map(r)), (layout.x_ms(t1), y.map(r))])
            .collect()
    };
    for (i, rs) in edge_rates.iter().enumerate() {
        let style = format!(" stroke=\"{}\" stroke-width=\"1.4\"", edge_colour(i));
        draw_series(svg, "acked", edge_name(t, i), steps(rs), &style);
    }
    // Drawn last so the total stays readable where edges overlap it.
    let style = format!(" stroke=\"{LOG_COLOUR}\" stroke-width=\"2\"");
    draw_series(svg, "log", "", steps(&log_rates), &style);
    svg.text(
        PLOT_LEFT_PX + 6.0,
        top + 13.0,
        "start",
        " fill=\"#555555\"",
        "into the log (black) and acknowledged to devices per edge",
    );
    svg.out.push_str("</g>\n");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Up,
    Down,
    NotRunning,
    Unknown,
}

/// Runs of one link state for one edge: (from ms, to ms, state). A sample's
/// state holds until the next sample; the last holds for one more interval.
fn link_runs(t: &Timeline, edge: usize) -> Vec<(u64, u64, LinkState)> {
    let mut runs: Vec<(u64, u64, LinkState)> = Vec::new();
    for (k, s) in t.samples.iter().enumerate() {
        let state = match s.edges.get(edge) {
            None => LinkState::Unknown,
            Some(e) if !e.running => LinkState::NotRunning,
            Some(e) if e.link_up => LinkState::Up,
            Some(_) => LinkState::Down,
        };
        let end = match (
            t.samples.get(k + 1),
            k.checked_sub(1).and_then(|p| t.samples.get(p)),
        ) {
            (Some(next), _) => next.t_ms,
            (None, Some(prev)) => s.t_ms.saturating_add(s.t_ms.saturating_sub(prev.t_ms)),
            (None, None) => s.t_ms,
        };
        let end = end.max(s.t_ms);
        match runs.last_mut() {
            Some(last) if last.2 == state && last.1 == s.t_ms => last.1 = end,
            _ => runs.push((s.t_ms, end, state)),
        }
    }
    runs.retain(|r| r.1 > r.0 && r.2 != LinkState::Unknown);
    runs
}

fn draw_strips(svg: &mut Doc, t: &Timeline, layout: &Layout) {
    svg.out.push_str("<g class=\"link-strips\">\n");
    for (i, name) in t.edges.iter().enumerate() {
        let top = layout.strips_top_px + i as f64 * (STRIP_HEIGHT_PX + STRIP_GAP_PX);
        svg.text(
            PLOT_LEFT_PX - 6.0,
            top + STRIP_HEIGHT_PX / 2.0 + 4.0,
            "end",
            &format!(" fill=\"{}\" font-weight=\"bold\"", edge_colour(i)),
            &truncate(name, EDGE_NAME_CHARS_MAX),
        );
        for (from, to, state) in link_runs(t, i) {
            let (colour, what) = match state {
                LinkState::Up => (LINK_UP_COLOUR, "link up"),
                LinkState::Down => (LINK_DOWN_COLOUR, "link down"),
                LinkState::NotRunning => (EDGE_DOWN_COLOUR, "not running"),
                LinkState::Unknown => continue,
            };
            let x0 = layout.x_ms(from);
            let x1 = layout.x_ms(to);
            svg.push(format_args!(
                "<rect class=\"link\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" \
                 fill=\"{colour}\"><title>{}</title></rect>\n",
                num(x0),
                num(top),
                num((x1 - x0).max(0.0)),
                num(STRIP_HEIGHT_PX),
                esc(&format!("{name}: {what} {}–{}", secs(from), secs(to)))
            ));
        }
        svg.push(format_args!(
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"{FRAME_COLOUR}\"/>\n",
            num(PLOT_LEFT_PX),
            num(top),
            num(PLOT_RIGHT_PX - PLOT_LEFT_PX),
            num(STRIP_HEIGHT_PX)
        ));
    }
    svg.out.push_str("</g>\n");
}

/// Events ordered by start, ties kept in recorded order.
fn events_by_time(t: &Timeline) -> Vec<&TimelineEvent> {
    let mut events: Vec<&TimelineEvent> = t.events.iter().collect();
    events.sort_by_key(|e| e.at_ms);
    events
}

fn event_text(e: &TimelineEvent) -> String {
    let text = match (e.target.is_empty(), e.label.is_empty()) {
        (true, _) => e.label.clone(),
        (false, true) => e.target.clone(),
        (false, false) => format!("{} · {}", e.target, e.label),
    };
    truncate(&text, EVENT_LABEL_CHARS_MAX)
}

fn draw_bands(svg: &mut Doc, t: &Timeline, layout: &Layout) {
    let (top, bottom) = layout.span_px();
    svg.out.push_str("<g class=\"faults\">\n");
    for e in events_by_time(t) {
        let x0 = layout.x_ms(e.at_ms);
        let tip = esc(&format!(
            "{} at {}{}",
            event_text(e),
            secs(e.at_ms),
            e.until_ms
                .map(|u| format!(" until {}", secs(u)))
                .unwrap_or_default()
        ));
        match e.until_ms {
            Some(until) => {
                let x1 = layout.x_ms(until.max(e.at_ms));
                svg.push(format_args!(
                    "<rect class=\"fault\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" \
                     fill=\"{FAULT_COLOUR}\" fill-opacity=\"0.16\" stroke=\"{FAULT_COLOUR}\" \
                     stroke-opacity=\"0.5\"><title>{tip}</title></rect>\n",
                    num(x0),
                    num(top),
                    num((x1 - x0).max(1.0)),
                    num(bottom - top)
                ));
            }
            None => svg.push(format_args!(
                "<line class=\"event\" x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" \
                 stroke=\"{POINT_EVENT_COLOUR}\" stroke-width=\"1.2\" stroke-dasharray=\"2 2\">\
                 <title>{tip}</title></line>\n",
                num(top),
                num(bottom),
                x = num(x0)
            )),
        }
    }
    svg.out.push_str("</g>\n");
}

/// Rows of labels filled left to right, in the order the labels start.
struct LabelRows {
    ends_px: Vec<f64>,
}

impl LabelRows {
    const GAP_PX: f64 = 8.0;

    fn new(rows: usize) -> LabelRows {
        LabelRows {
            ends_px: vec![f64::NEG_INFINITY; rows],
        }
    }

    /// Puts a label of width `w` starting at `x` (moved left if it would
    /// leave the plot) in the first row where it overlaps nothing; returns
    /// (row, x), or None when every row is taken there.
    fn place(&mut self, x: f64, w: f64) -> Option<(usize, f64)> {
        let x = x.min(PLOT_RIGHT_PX - w).max(PLOT_LEFT_PX);
        let row = self
            .ends_px
            .iter()
            .position(|end| end + Self::GAP_PX <= x)?;
        self.ends_px[row] = x + w;
        Some((row, x))
    }
}

fn draw_event_labels(svg: &mut Doc, t: &Timeline, layout: &Layout) {
    let mut rows = LabelRows::new(layout.label_rows);
    svg.out.push_str("<g class=\"event-labels\">\n");
    for e in events_by_time(t) {
        let at = layout.x_ms(e.at_ms);
        // Where the full text finds no room, the bare label may; where that
        // does not either, the band's tooltip and the HTML event list still
        // name the event, which beats unreadable overprinting.
        let short = truncate(&e.label, EVENT_LABEL_CHARS_MAX);
        let placed = [event_text(e), short]
            .into_iter()
            .filter(|text| !text.is_empty())
            .find_map(|text| Some((rows.place(at + 2.0, text_width_px(&text))?, text)));
        let Some(((row, x), text)) = placed else {
            continue;
        };
        let baseline = layout.labels_top_px + (row + 1) as f64 * LABEL_ROW_PX - 3.0;
        let colour = if e.until_ms.is_some() {
            FAULT_TEXT_COLOUR
        } else {
            POINT_EVENT_COLOUR
        };
        svg.line(
            (at, baseline + 2.0),
            (at, layout.backlog_top_px),
            &format!(" stroke=\"{colour}\" stroke-opacity=\"0.45\" stroke-dasharray=\"1 2\""),
        );
        svg.text(x, baseline, "start", &format!(" fill=\"{colour}\""), &text);
    }
    svg.out.push_str("</g>\n");
}

/// A vertical marker across all panels with its label in the marker row,
/// right of the line if `right`, else left, unless that leaves the plot; a
/// label that would overlap `taken` (another marker's label) moves past it.
/// Returns the span its label takes.
fn draw_marker(
    svg: &mut Doc,
    layout: &Layout,
    at_ms: u64,
    text: &str,
    colour: &str,
    right: bool,
    taken: Option<(f64, f64)>,
) -> (f64, f64) {
    let (_, bottom) = layout.span_px();
    let x = layout.x_ms(at_ms);
    svg.line(
        (x, layout.markers_top_px + 2.0),
        (x, bottom),
        &format!(" stroke=\"{colour}\" stroke-width=\"1.5\" stroke-dasharray=\"6 3\""),
    );
    let w = text_width_px(text);
    let right = if right {
        x + 4.0 + w <= PLOT_RIGHT_PX
    } else {
        x - 4.0 - w < PLOT_LEFT_PX
    };
    let mut start = if right { x + 4.0 } else { x - 4.0 - w };
    if let Some((lo, hi)) = taken {
        if start < hi && start + w > lo {
            start = if hi + 8.0 + w <= PLOT_RIGHT_PX {
                hi + 8.0
            } else {
                lo - 8.0 - w
            };
        }
    }
    svg.text(
        start,
        layout.markers_top_px + 12.0,
        "start",
        &format!(" fill=\"{colour}\" font-weight=\"bold\""),
        text,
    );
    (start, start + w)
}

fn draw_markers(svg: &mut Doc, t: &Timeline, layout: &Layout) {
    svg.out.push_str("<g class=\"markers\">\n");
    let faults_end = draw_marker(
        svg,
        layout,
        t.faults_end_ms,
        "faults end",
        "#333333",
        false,
        None,
    );
    let (at, text, colour) = match t.drained_at_ms {
        Some(at) => {
            let text = match at.checked_sub(t.faults_end_ms) {
                Some(after) => format!("drained (+{})", secs(after)),
                None => "drained".to_string(),
            };
            (at, text, OK_COLOUR)
        }
        None => (
            t.faults_end_ms.saturating_add(t.drain_budget_ms),
            "not drained within budget".to_string(),
            FAIL_COLOUR,
        ),
    };
    draw_marker(svg, layout, at, &text, colour, true, Some(faults_end));
    svg.out.push_str("</g>\n");
}

/// One line on phases for the HTML page.
fn phase_summary(t: &Timeline) -> String {
    let faults = format!("Faults until {}", secs(t.faults_end_ms));
    let budget = secs(t.drain_budget_ms);
    match t.drained_at_ms {
        Some(at) => format!(
            "{faults}; the backlog drained at {} ({} after faults; budget {budget}).",
            secs(at),
            secs(at.saturating_sub(t.faults_end_ms))
        ),
        None => format!("{faults}; the backlog did not drain within the budget of {budget}."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that tags nest and close, and that every `&` starts an entity:
    /// enough to catch broken escaping or a half-written element.
    fn assert_well_formed(doc: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = doc;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            for (k, _) in text.match_indices('&') {
                let entity = &text[k..];
                let end = entity.find(';').expect("an entity ends with ';'");
                assert!(
                    end <= 8,
                    "bare '&' in {:?}",
                    &entity[..entity.len().min(20)]
                );
            }
            let close = rest[open..].find('>').expect("a tag ends with '>'") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "'<' inside a tag: {tag}");
            if tag.starts_with('!') || tag.starts_with('?') {
                // DOCTYPE or a declaration: nothing to balance.
            } else if let Some(name) = tag.strip_prefix('/') {
                let top = stack
                    .pop()
                    .unwrap_or_else(|| panic!("</{name}> closes nothing"));
                assert_eq!(top, name.trim(), "mismatched close tag");
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().unwrap_or("").to_string();
                // HTML void elements need no close tag.
                if name != "meta" {
                    stack.push(name);
                }
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed tags: {stack:?}");
    }

    fn assert_sane_svg(svg: &str) {
        assert!(svg.starts_with("<svg "), "starts with <svg");
        assert!(svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches("</svg>").count(), 1);
        assert!(!svg.contains("NaN"), "no NaN coordinates");
        assert!(!svg.contains("inf"), "no infinite coordinates");
        assert_well_formed(svg);
    }

    fn edge(backlog_bytes: u64, acked_total: u64, link_up: bool, running: bool) -> EdgeSample {
        EdgeSample {
            backlog_readings: backlog_bytes / 64,
            backlog_bytes,
            acked_total,
            link_up,
            running,
        }
    }

    /// Two edges for 60 s at 100 ms; a partition cuts edge-1 off from 10 s
    /// to 25 s, so its backlog grows and then drains after faults end at
    /// 28 s; edge-2 loses packets for a while and crashes briefly.
    fn realistic() -> Timeline {
        const ACCEPT_PER_S: [u64; 2] = [200, 150];
        const UPLINK_PER_S: u64 = 600;
        const LOSSY_UPLINK_PER_S: u64 = 100;
        const READING_BYTES: u64 = 64;
        const IN_FLIGHT_READINGS: u64 = 12;
        const FAULTS_END_MS: u64 = 28_000;
        let mut samples = Vec::new();
        let (mut acked, mut backlog) = ([0u64; 2], [0u64; 2]);
        let mut log_total = 0;
        let mut drained_at_ms = None;
        let mut peak_bytes = 0;
        for k in 0..=600u64 {
            let t_ms = k * 100;
            let mut edges = Vec::new();
            for e in 0..2 {
                let running = !(e == 1 && (26_000..27_500).contains(&t_ms));
                let link_up = running && !(e == 0 && (10_000..25_000).contains(&t_ms));
                if k > 0 && running {
                    acked[e] += ACCEPT_PER_S[e] / 10;
                    backlog[e] += ACCEPT_PER_S[e] / 10;
                }
                if k > 0 && link_up {
                    let lossy = e == 1 && (12_000..20_000).contains(&t_ms);
                    let uplink = if lossy {
                        LOSSY_UPLINK_PER_S
                    } else {
                        UPLINK_PER_S
                    };
                    let moved = backlog[e].min(uplink / 10);
                    backlog[e] -= moved;
                    log_total += moved;
                }
                let held = backlog[e] + if link_up { IN_FLIGHT_READINGS } else { 0 };
                edges.push(edge(held * READING_BYTES, acked[e], link_up, running));
            }
            let idle = edges
                .iter()
                .all(|e| e.backlog_bytes <= IN_FLIGHT_READINGS * READING_BYTES);
            if drained_at_ms.is_none() && t_ms >= FAULTS_END_MS && idle {
                drained_at_ms = Some(t_ms);
            }
            peak_bytes = edges
                .iter()
                .map(|e| e.backlog_bytes)
                .fold(peak_bytes, u64::max);
            samples.push(Sample {
                t_ms,
                edges,
                log_readings_total: log_total,
            });
        }
        Timeline {
            title: "partition-flap · seed 7".to_string(),
            replay_command: "cargo run -p tributary-simulations -- --scenario partition-flap \
                             --seed 7"
                .to_string(),
            edges: vec!["edge-1".to_string(), "edge-2".to_string()],
            outbox_bytes_max: 512 * 1024,
            samples,
            events: vec![
                TimelineEvent {
                    at_ms: 10_000,
                    until_ms: Some(25_000),
                    target: "link edge-1→cloud".to_string(),
                    label: "partition".to_string(),
                },
                TimelineEvent {
                    at_ms: 12_000,
                    until_ms: Some(20_000),
                    target: "link edge-2→cloud".to_string(),
                    label: "loss 20%".to_string(),
                },
                TimelineEvent {
                    at_ms: 26_000,
                    until_ms: None,
                    target: "edge-2".to_string(),
                    label: "crash".to_string(),
                },
                TimelineEvent {
                    at_ms: 27_500,
                    until_ms: None,
                    target: "edge-2".to_string(),
                    label: "restart".to_string(),
                },
            ],
            faults_end_ms: FAULTS_END_MS,
            drained_at_ms,
            drain_budget_ms: 15_000,
            verdict: Ok(()),
            figures: vec![
                (
                    "readings acknowledged".to_string(),
                    acked.iter().sum::<u64>().to_string(),
                ),
                ("readings in log".to_string(), log_total.to_string()),
                ("peak backlog".to_string(), human_bytes(peak_bytes)),
                ("duplicates in log".to_string(), "0".to_string()),
            ],
        }
    }

    #[test]
    fn realistic_svg_is_well_formed_with_one_backlog_line_per_edge() {
        let t = realistic();
        let svg = render_svg(&t);
        assert_sane_svg(&svg);
        assert_eq!(svg.matches("<polyline class=\"backlog\"").count(), 2);
        assert!(svg.contains("data-edge=\"edge-1\""));
        assert_eq!(svg.matches("<polyline class=\"acked\"").count(), 2);
        assert_eq!(svg.matches("<polyline class=\"log\"").count(), 1);
        assert_eq!(svg.matches("<rect class=\"fault\"").count(), 2);
        assert_eq!(svg.matches("<line class=\"event\"").count(), 2);
        assert!(svg.contains("faults end"));
        assert_eq!(t.drained_at_ms, Some(32_400));
        assert!(svg.contains("drained (+4.4 s)"));
        assert!(!svg.contains("not drained"));
        assert!(svg.contains("outbox budget 512 KiB"));
        // The partition shows as one red run on edge-1's strip.
        assert!(svg.contains("edge-1: link down 10 s–25 s"));
        assert!(svg.contains("edge-2: not running 26 s–27.5 s"));
    }

    #[test]
    fn title_and_texts_are_escaped() {
        let mut t = realistic();
        t.title = "a <&> \"b\" 'c'".to_string();
        t.edges[0] = "<edge>".to_string();
        t.events[0].label = "x < y & z".to_string();
        t.verdict = Err("lost <reading> & \u{1} more".to_string());
        t.figures.push(("<k>".to_string(), "&v".to_string()));
        t.replay_command = "sim --seed 7 && echo '<done>'".to_string();
        let svg = render_svg(&t);
        assert_sane_svg(&svg);
        assert!(svg.contains("a &lt;&amp;&gt; &quot;b&quot; &#39;c&#39;"));
        assert!(!svg.contains("<&>"));
        assert!(svg.contains("data-edge=\"&lt;edge&gt;\""));
        assert!(!svg.contains('\u{1}'), "control characters are replaced");
        let html = render_html(&t);
        assert_well_formed(&html);
        assert!(html.contains("<title>a &lt;&amp;&gt;"));
        assert!(html.contains("&lt;k&gt;"));
        assert!(html.contains("&amp;v"));
        assert!(html.contains("sim --seed 7 &amp;&amp; echo &#39;&lt;done&gt;&#39;"));
    }

    #[test]
    fn empty_timeline_renders() {
        let t = Timeline::default();
        let svg = render_svg(&t);
        assert_sane_svg(&svg);
        assert_eq!(svg.matches("<polyline class=\"backlog\"").count(), 0);
        // Nothing drained within a zero budget.
        assert!(svg.contains("not drained within budget"));
        let html = render_html(&t);
        assert_well_formed(&html);
        assert!(html.contains("No faults, crashes or restarts."));
    }

    #[test]
    fn degenerate_timelines_render_without_panicking() {
        let huge = edge(u64::MAX, u64::MAX, true, true);
        let cases = [
            // One sample.
            Timeline {
                edges: vec!["e".to_string()],
                samples: vec![Sample {
                    t_ms: 500,
                    edges: vec![edge(10, 1, true, true)],
                    log_readings_total: 1,
                }],
                ..Timeline::default()
            },
            // Edges declared but never sampled, samples at the same instant.
            Timeline {
                edges: vec!["a".to_string(), "b".to_string(), "c".to_string()],
                samples: vec![Sample::default(), Sample::default()],
                drained_at_ms: Some(0),
                ..Timeline::default()
            },
            // Zero everywhere.
            Timeline {
                edges: vec!["z".to_string()],
                samples: (0..10)
                    .map(|k| Sample {
                        t_ms: k * 100,
                        edges: vec![EdgeSample::default()],
                        log_readings_total: 0,
                    })
                    .collect(),
                ..Timeline::default()
            },
            // Huge values, counters that go back, time that goes back,
            // an event that ends before it starts, many overlapping events.
            Timeline {
                title: "x".repeat(10_000),
                edges: (0..20)
                    .map(|i| format!("edge-with-a-long-name-{i}"))
                    .collect(),
                outbox_bytes_max: u64::MAX,
                samples: vec![
                    Sample {
                        t_ms: 0,
                        edges: vec![huge.clone(); 20],
                        log_readings_total: u64::MAX,
                    },
                    Sample {
                        t_ms: u64::MAX,
                        edges: vec![],
                        log_readings_total: 0,
                    },
                    Sample {
                        t_ms: 5,
                        edges: vec![huge.clone(); 3],
                        log_readings_total: 7,
                    },
                ],
                events: (0..30)
                    .map(|i| TimelineEvent {
                        at_ms: 1000 + i,
                        until_ms: Some(i),
                        target: "link".to_string(),
                        label: "y".repeat(500),
                    })
                    .collect(),
                faults_end_ms: u64::MAX,
                drain_budget_ms: u64::MAX,
                verdict: Err(String::new()),
                ..Timeline::default()
            },
        ];
        for t in &cases {
            assert_sane_svg(&render_svg(t));
            assert_well_formed(&render_html(t));
        }
        assert!(
            render_svg(&cases[0]).contains("<circle"),
            "a single point is visible"
        );
        assert_eq!(
            render_svg(&cases[1])
                .matches("<polyline class=\"backlog\"")
                .count(),
            3
        );
    }

    #[test]
    fn output_is_deterministic() {
        let t = realistic();
        assert_eq!(render_svg(&t), render_svg(&t.clone()));
        assert_eq!(render_html(&t), render_html(&t.clone()));
    }

    #[test]
    fn violation_is_shown_in_red_with_the_missed_deadline() {
        let mut t = realistic();
        t.drained_at_ms = None;
        t.verdict = Err("reading dev-2#41 acknowledged but not in the log".to_string());
        let svg = render_svg(&t);
        assert_sane_svg(&svg);
        assert!(svg.contains("not drained within budget"));
        assert!(svg.contains("✗ violation: reading dev-2#41 acknowledged but not in the log"));
        let html = render_html(&t);
        assert!(html.contains("class=\"verdict fail\""));
        assert!(!html.contains("class=\"verdict ok\""));
        assert!(html.contains("did not drain within the budget of 15 s"));
    }

    #[test]
    fn rates_come_from_counter_deltas() {
        let r = rates(&[(0, 0), (1000, 100), (1500, 300), (1500, 400), (2500, 350)]);
        assert_eq!(
            r,
            vec![(0, 1000, 100.0), (1000, 1500, 400.0), (1500, 2500, 0.0)]
        );
        assert!(rates(&[]).is_empty());
        assert!(rates(&[(5, 5)]).is_empty());
    }

    #[test]
    fn ticks_are_round_in_human_units() {
        let labels = |t: Ticks| t.values.into_iter().map(|v| v.1).collect::<Vec<_>>();
        assert_eq!(
            labels(byte_ticks(512.0 * 1024.0 * 1.05)),
            ["0", "100 KiB", "200 KiB", "300 KiB", "400 KiB", "500 KiB", "600 KiB"]
        );
        assert_eq!(
            labels(byte_ticks(5.0 * 1024.0 * 1024.0)),
            ["0", "1 MiB", "2 MiB", "3 MiB", "4 MiB", "5 MiB"]
        );
        assert_eq!(
            labels(rate_ticks(0.0)),
            ["0", "0.2/s", "0.4/s", "0.6/s", "0.8/s", "1.0/s"]
        );
        assert_eq!(
            labels(rate_ticks(1800.0)),
            ["0", "0.5k/s", "1.0k/s", "1.5k/s", "2.0k/s"]
        );
        assert_eq!(labels(byte_ticks(0.0)), ["0", "1 B"]);
        let huge = byte_ticks(u64::MAX as f64);
        assert!(huge.top >= u64::MAX as f64);
        assert_eq!(x_ticks(60_000).len(), 13);
        assert_eq!(x_ticks(60_000)[12].1, "60");
        assert_eq!(secs(47_300), "47.3 s");
        assert_eq!(secs(4), "0.004 s");
        assert_eq!(human_bytes(512 * 1024), "512 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn overlapping_labels_take_different_rows() {
        let mut rows = LabelRows::new(3);
        assert_eq!(rows.place(200.0, 100.0), Some((0, 200.0)));
        assert_eq!(rows.place(250.0, 100.0), Some((1, 250.0)));
        assert_eq!(rows.place(400.0, 50.0), Some((0, 400.0)));
        assert_eq!(rows.place(260.0, 10.0), Some((2, 260.0)));
        // With every row taken there, the label is not drawn over another.
        assert_eq!(rows.place(270.0, 10.0), None);
        // A label near the right edge moves left to stay inside the plot.
        let mut rows = LabelRows::new(1);
        assert_eq!(
            rows.place(PLOT_RIGHT_PX - 10.0, 100.0),
            Some((0, PLOT_RIGHT_PX - 100.0))
        );
        assert_eq!(LabelRows::new(0).place(500.0, 1.0), None);
    }

    #[test]
    fn long_series_are_thinned_but_keep_peaks() {
        let points: Vec<(f64, f64)> = (0..100_000)
            .map(|i| {
                (
                    100.0 + i as f64 / 200.0,
                    if i == 50_123 { 7.0 } else { 50.0 },
                )
            })
            .collect();
        let thinned = thin(points);
        assert!(thinned.len() <= 4 * 500 + 4, "{} points", thinned.len());
        assert!(thinned.contains(&(100.0 + 50_123.0 / 200.0, 7.0)));
    }

    /// Writes the realistic run to $TRIBUTARY_REPORT_SAMPLE_DIR (or the temp
    /// dir) as report-sample.svg/.html, to look at.
    #[test]
    #[ignore = "writes files for a person to look at"]
    fn write_sample_report() {
        let dir = std::env::var_os("TRIBUTARY_REPORT_SAMPLE_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let t = realistic();
        std::fs::write(dir.join("report-sample.svg"), render_svg(&t)).expect("write svg");
        std::fs::write(dir.join("report-sample.html"), render_html(&t)).expect("write html");
    }
}
