//! A ladder drawn in text for a terminal (`relayd trace CALL-ID`): a time, then the columns
//! terminal | relay | server(s), each message an arrow with its method or status, each
//! decision a note beside the relay's line.
//!
//! ```text
//! 12:00:00.000  terminal            relay               server
//! 12:00:00.000      |------INVITE------>|                   |
//! 12:00:00.001      |                   * rule r1 matched   |
//! ```

use super::ladder::{clock, Ladder, Row, RELAY};

/// The width of a column, in characters.
const WIDTH: usize = 32;

/// The ladder as lines of text, each ending in a newline.
pub fn render(ladder: &Ladder) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "call {}\n",
        ladder.call_ids.first().map(String::as_str).unwrap_or("")
    ));
    for leg in ladder.call_ids.iter().skip(1) {
        out.push_str(&format!("  leg {leg}\n"));
    }
    let n = ladder.columns.len();
    out.push_str(&format!("  {}\n", ladder.columns.join(" | ")));
    let mut head = vec![' '; n * WIDTH];
    for (i, title) in ladder.columns.iter().enumerate() {
        let title: Vec<char> = title.chars().take(WIDTH - 1).collect();
        let start = (center(i) + 1).saturating_sub(title.len().div_ceil(2));
        put(&mut head, start, &title);
    }
    out.push_str(&format!("{:12}  {}\n", "", trim(&head)));
    for row in &ladder.rows {
        let mut line = grid(n);
        match row {
            Row::Arrow {
                at,
                from,
                to,
                label,
                cseq,
            } => {
                let (lo, hi) = (center(*from.min(to)), center(*from.max(to)));
                for c in line.iter_mut().take(hi).skip(lo + 1) {
                    *c = '-';
                }
                if to > from {
                    line[hi - 1] = '>';
                } else {
                    line[lo + 1] = '<';
                }
                let text = arrow_label(label, cseq);
                let room = hi - lo - 3;
                let text: Vec<char> = text.chars().take(room).collect();
                let start = lo + 2 + (room - text.len()) / 2;
                put(&mut line, start, &text);
                out.push_str(&format!("{}  {}\n", clock(*at), trim(&line)));
            }
            Row::Note { at, text } => {
                let c = center(RELAY);
                line[c] = '*';
                let text: Vec<char> = format!(" {text}").chars().collect();
                let mut line: Vec<char> = line[..=c].to_vec();
                line.extend(text);
                out.push_str(&format!("{}  {}\n", clock(*at), trim(&line)));
            }
        }
    }
    out
}

/// A response's label names the method it answers (`200 OK (BYE)`).
pub fn arrow_label(label: &str, cseq: &str) -> String {
    let method = cseq.split_whitespace().nth(1).unwrap_or("");
    if label.starts_with(|c: char| c.is_ascii_digit()) && !method.is_empty() {
        format!("{label} ({method})")
    } else {
        label.to_owned()
    }
}

fn center(column: usize) -> usize {
    column * WIDTH + WIDTH / 2
}

fn grid(columns: usize) -> Vec<char> {
    let mut line = vec![' '; columns * WIDTH];
    for i in 0..columns {
        line[center(i)] = '|';
    }
    line
}

fn put(line: &mut Vec<char>, start: usize, text: &[char]) {
    if line.len() < start + text.len() {
        line.resize(start + text.len(), ' ');
    }
    line[start..start + text.len()].copy_from_slice(text);
}

fn trim(line: &[char]) -> String {
    line.iter().collect::<String>().trim_end().to_owned()
}
