//! The worker table of `clusterd ls` and `kubectl clustered ls`: columns
//! padded like `kubectl get`, the state coloured only when asked, ages and
//! sizes in kubectl's units. Pure text; the callers fetch and print.

use crate::wire::WorkerState;

/// What `ls` prints: the table, or the document it is made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// Colour only on a terminal, and not when `NO_COLOR` is set.
pub fn colour_wanted(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// What goes before a watch's next print: a terminal is redrawn in place,
/// a pipe gets one document after another.
pub fn separator(first: bool, output: Output, terminal: bool) -> &'static str {
    match (first, output) {
        (true, _) => "",
        (false, Output::Table) if terminal => "\x1b[H\x1b[2J",
        (false, Output::Table | Output::Json) => "\n",
        (false, Output::Yaml) => "---\n",
    }
}

/// One table row: its cells, and the worker state that colours its STATE cell.
pub struct Row {
    pub cells: Vec<String>,
    pub state: Option<WorkerState>,
}

/// `headers` then `rows`, each column as wide as its widest cell and three
/// spaces apart, trailing blanks trimmed. With `colour`, the cell under the
/// `STATE` header is coloured by its row's state.
pub fn layout(headers: &[&str], rows: &[Row], colour: bool) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(&row.cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let state_column = headers.iter().position(|h| *h == "STATE");
    let line = |cells: &[String], state: Option<WorkerState>| {
        let last = cells.len().saturating_sub(1);
        let mut line = String::new();
        for (i, (cell, &width)) in cells.iter().zip(&widths).enumerate() {
            let padded = if i == last { cell.clone() } else { format!("{cell:<width$}   ") };
            match state.filter(|_| colour && Some(i) == state_column) {
                Some(state) => line.push_str(&format!("\x1b[{}m{padded}\x1b[0m", state_colour(state))),
                None => line.push_str(&padded),
            }
        }
        line.trim_end().to_string() + "\n"
    };
    let mut out = line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>(), None);
    for row in rows {
        out.push_str(&line(&row.cells, row.state));
    }
    out
}

/// ANSI colour of a state: green serves, yellow is on its way, red is trouble.
pub fn state_colour(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Ready => "32",
        WorkerState::Starting | WorkerState::Draining | WorkerState::Backoff => "33",
        WorkerState::Unhealthy | WorkerState::CrashLoop => "31",
        WorkerState::Stopped | WorkerState::Unknown => "2",
    }
}

/// Like `kubectl get`'s AGE, from whole seconds: the largest unit or two
/// (`45s`, `3m12s`, `5h3m`, `2d4h`); a negative age (a clock behind) is `0s`.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        ..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..7200 => format!("{}m", s / 60),
        7200..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Bytes as MiB (binary units, as Kubernetes writes `Mi`).
pub fn mebibytes(bytes: u64) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if mib < 10.0 { format!("{mib:.1}Mi") } else { format!("{mib:.0}Mi") }
}

/// Cores as a share of one core, as `pm2 ls` and `top` write it.
pub fn percent(cores: f64) -> String {
    format!("{:.0}%", cores * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_to_their_widest_cell_and_only_state_is_coloured() {
        let rows = [
            Row { cells: vec!["0".into(), "Ready".into(), "a long last".into()], state: Some(WorkerState::Ready) },
            Row { cells: vec!["10".into(), "Backoff".into(), "-".into()], state: Some(WorkerState::Backoff) },
        ];
        let plain = layout(&["ID", "STATE", "LAST"], &rows, false);
        assert_eq!(plain, "ID   STATE     LAST\n0    Ready     a long last\n10   Backoff   -\n");
        let coloured = layout(&["ID", "STATE", "LAST"], &rows, true);
        assert!(coloured.contains("0    \x1b[32mReady     \x1b[0ma long"), "{coloured}");
        let stripped = coloured.replace("\x1b[32m", "").replace("\x1b[33m", "").replace("\x1b[0m", "");
        assert_eq!(stripped, plain);
    }

    #[test]
    fn a_watch_redraws_a_terminal_and_separates_documents_in_a_pipe() {
        assert_eq!(separator(true, Output::Table, true), "");
        assert_eq!(separator(false, Output::Table, true), "\x1b[H\x1b[2J");
        assert_eq!(separator(false, Output::Table, false), "\n");
        assert_eq!(separator(false, Output::Json, true), "\n");
        assert_eq!(separator(false, Output::Yaml, false), "---\n");
        assert!(!colour_wanted(false));
    }

    #[test]
    fn ages_and_sizes_read_like_kubectl() {
        assert_eq!(age(45), "45s");
        assert_eq!(age(192), "3m12s");
        assert_eq!(age(3000), "50m");
        assert_eq!(age(5 * 3600 + 180), "5h3m");
        assert_eq!(age(2 * 86_400 + 4 * 3600), "2d4h");
        assert_eq!(age(-10), "0s", "a clock behind the start is no negative age");
        assert_eq!(mebibytes(5 << 19), "2.5Mi");
        assert_eq!(mebibytes(300 << 20), "300Mi");
        assert_eq!(percent(0.984), "98%");
    }
}
