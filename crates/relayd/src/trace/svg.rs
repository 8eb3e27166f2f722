//! A ladder drawn as plain SVG (no script): a vertical line per column, an arrow per
//! message with its label above it and its time on the left, a note per decision beside
//! the relay's line. Every text from the network is escaped ([`crate::markup::escape`]).

use std::fmt::Write as _;

use super::ladder::{clock, Ladder, Row, RELAY};
use super::text::arrow_label;
use crate::markup::escape;

const COLUMN: usize = 220;
const LEFT: usize = 100;
const ROW: usize = 30;
const TOP: usize = 50;

/// The ladder as an `<svg>` element.
pub fn render(ladder: &Ladder) -> String {
    let n = ladder.columns.len();
    let width = LEFT + n * COLUMN;
    let height = TOP + (ladder.rows.len() + 1) * ROW;
    let x = |column: usize| LEFT + column * COLUMN + COLUMN / 2;
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="ladder" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="monospace" font-size="12">"##
    );
    let _ = write!(
        out,
        "<title>call {}</title>",
        escape(ladder.call_ids.first().map(String::as_str).unwrap_or(""))
    );
    for (i, title) in ladder.columns.iter().enumerate() {
        let _ = write!(
            out,
            r##"<text x="{}" y="20" text-anchor="middle" font-weight="bold">{}</text><line x1="{0}" y1="30" x2="{0}" y2="{}" stroke="#888"/>"##,
            x(i),
            escape(title),
            height - 5
        );
    }
    for (r, row) in ladder.rows.iter().enumerate() {
        let y = TOP + r * ROW + ROW / 2;
        match row {
            Row::Arrow {
                at,
                from,
                to,
                label,
                cseq,
            } => {
                let (x1, x2) = (x(*from), x(*to));
                let head = if x2 > x1 { x2 - 8 } else { x2 + 8 };
                let failed = label.starts_with(['3', '4', '5', '6']);
                let colour = if failed { "#c00" } else { "#036" };
                let _ = write!(
                    out,
                    r##"<g class="message"><text x="4" y="{y}" fill="#555">{}</text><line x1="{x1}" y1="{y}" x2="{x2}" y2="{y}" stroke="{colour}"/><polygon points="{x2},{y} {head},{} {head},{}" fill="{colour}"/><text x="{}" y="{}" text-anchor="middle" fill="{colour}">{}</text></g>"##,
                    clock(*at),
                    y - 4,
                    y + 4,
                    (x1 + x2) / 2,
                    y - 5,
                    escape(&arrow_label(label, cseq))
                );
            }
            Row::Note { at, text } => {
                let _ = write!(
                    out,
                    r##"<g class="note"><text x="4" y="{y}" fill="#555">{}</text><circle cx="{}" cy="{}" r="3" fill="#a60"/><text x="{}" y="{}" fill="#a60" font-style="italic">{}</text></g>"##,
                    clock(*at),
                    x(RELAY),
                    y - 4,
                    x(RELAY) + 8,
                    y,
                    escape(text)
                );
            }
        }
    }
    out.push_str("</svg>");
    out
}
